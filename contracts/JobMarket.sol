// SPDX-License-Identifier: Apache-2.0
pragma solidity ^0.8.24;

import {IERC20} from "@openzeppelin/contracts/token/ERC20/IERC20.sol";
import {IERC20Permit} from "@openzeppelin/contracts/token/ERC20/extensions/IERC20Permit.sol";
import {SafeERC20} from "@openzeppelin/contracts/token/ERC20/utils/SafeERC20.sol";
import {AccessControl} from "@openzeppelin/contracts/access/AccessControl.sol";
import {ReentrancyGuardTransient} from "@openzeppelin/contracts/utils/ReentrancyGuardTransient.sol";
import {SafeCast} from "@openzeppelin/contracts/utils/math/SafeCast.sol";
import {Hashes} from "@openzeppelin/contracts/utils/cryptography/Hashes.sol";
import {EIP712} from "@openzeppelin/contracts/utils/cryptography/EIP712.sol";
import {ECDSA} from "@openzeppelin/contracts/utils/cryptography/ECDSA.sol";
import {MessageHashUtils} from "@openzeppelin/contracts/utils/cryptography/MessageHashUtils.sol";
import {INodeRegistry, ROUTABLE_BIT} from "./interfaces/INodeRegistry.sol";

/// @title JobMarket
/// @notice Client escrow and batched per-job settlement of inference work.
/// @dev Flow: a client deposits DLIS into escrow and signs an EIP-712 `JobAuthorization`
///      (client, broker, model, max cost, nonce, deadline). Every pipeline stage that served the
///      job signs an EIP-712 `Receipt` with its node key (job id, model, layer range [start, end),
///      tokens, output hash, amount). The broker submits jobs in batches; for each job the
///      contract checks the client signature, the nonce (each (client, nonce) settles once:
///      nonce bitmap), the deadline, every receipt signature against a routable node in the
///      NodeRegistry, that the receipts cover the model's layers [0, numLayers) contiguously
///      and in order, and that receipts + protocol fee stay within the authorized maximum.
///      A layer range may be served by a group of nodes together (shared ranges: two share
///      workers computing a client's first layer on additive secret shares, a tensor-parallel
///      group), each billing its own share with its own receipt: a stage may repeat exactly the
///      previous stage's range when its signer is greater, as an address, than the previous
///      stage's (`_nextStage`), so a group's members come in ascending address order and no node
///      bills one range twice in a job. Each share is paid (or forfeited) as any receipt, and all
///      of them count toward the client's authorized maximum.
///      The client pays receipts + fee; node operators and the treasury are credited and pull
///      their money with `claim` (pull payments).
///      A receipt whose signer is a registered node that is no longer routable at settlement
///      (deregistered, or its operator under the minimum stake) is forfeited instead of failing
///      the job: its layers still count toward coverage, the client is not charged for it (nor
///      the fee on it), the other stages are paid, and `ReceiptForfeited` records it as evidence
///      against that node. So one stage leaving after serving cannot void the others' pay.
///      Escrow is held per (client, broker): a client deposits for a broker, and settlement draws
///      only from the part held for the settling broker. A broker admits against its own part
///      minus its own open jobs, so two brokers can never both count the same escrow (a client
///      cannot be admitted twice for one deposit). Moving escrow to another broker is a
///      withdrawal (with its delay) and a new deposit.
///      A broker cannot be paid for a job it settles: a receipt whose node key or node operator is
///      the settling broker reverts the job (`JobMarketSelfDealing`).
///      Escrow cannot be pulled from under admitted jobs: a withdrawal waits `withdrawDelay`
///      after its request and is usable only for `withdrawWindow` after that (then it expires
///      and must be requested again); settlement refuses an authorization whose deadline is more
///      than `maxAuthorizationLifetime` (< `withdrawDelay`) ahead of the settling block. A broker
///      that admits a job only while its deadline is within `maxAuthorizationLifetime` of the
///      admission time and only against escrow not covered by a live (unexpired) withdrawal
///      request therefore has the job settled, or its authorization expired, before any
///      withdrawal requested after the admission becomes ready: request time + withdrawDelay >
///      admission time + maxAuthorizationLifetime >= deadline >= settlement time.
///      There is no way to cancel an authorization once given (a cancellation could race a
///      served job's settlement and leave its nodes unpaid): clients bound their exposure with the
///      authorization's deadline and max cost.
///      Gas: signatures use EIP-2098 compact form (r, vs); node lookups and payee credits are
///      aggregated per batch in memory so each distinct payee costs one storage write per batch.
///      `settleJob` settles one job alone at the least gas: stages packed one word each, all its
///      nodes and its model looked up in one registry call, one credit per paid stage. Protocol
///      fees are credited to the treasury in the slot that holds the escrow total and fee rate
///      (every settlement writes it anyway), and the claimable total is derived (everything held
///      minus escrow), so no settlement writes a total or a treasury balance of its own.
///      `settleBatchMerkle` settles the same jobs with one signature per node per batch instead of
///      one per stage: each node signs a `BatchReceipt` over the Merkle root of its stages' receipt
///      leaves, which the contract rebuilds from the jobs in calldata (stages packed one word
///      each); the per-job checks above are unchanged. `redeemWinningTicket` is the probabilistic
///      alternative: a client-signed `PaymentTicket` to one node that pays its face value only
///      when it wins (keccak256(signature, recipient's revealed random number) < winProb), so on
///      average 1/p tickets cost one redemption; it checks no coverage or receipts (see README).
contract JobMarket is AccessControl, ReentrancyGuardTransient, EIP712 {
    using SafeERC20 for IERC20;

    /// @notice Role allowed to submit settlement batches.
    bytes32 public constant BROKER_ROLE = keccak256("BROKER_ROLE");
    /// @notice EIP-712 type of a client's authorization of one job.
    bytes32 public constant JOB_AUTHORIZATION_TYPEHASH = keccak256(
        "JobAuthorization(address client,address broker,bytes32 modelId,uint256 maxCost,uint256 nonce,uint256 deadline)"
    );
    /// @notice EIP-712 type of a stage's receipt for its part of one job.
    bytes32 public constant RECEIPT_TYPEHASH = keccak256(
        "Receipt(bytes32 jobId,bytes32 modelId,uint32 start,uint32 end,uint32 tokens,bytes32 outputHash,uint256 amount)"
    );
    /// @notice EIP-712 type of a node's one receipt for all its stages in a `settleBatchMerkle` batch.
    bytes32 public constant BATCH_RECEIPT_TYPEHASH = keccak256(
        "BatchReceipt(address node,address broker,bytes32 batchId,bytes32 root,uint256 total,uint32 count)"
    );
    /// @notice EIP-712 type of a client's probabilistic payment ticket to one node.
    bytes32 public constant PAYMENT_TICKET_TYPEHASH = keccak256(
        "PaymentTicket(address client,address broker,address recipient,uint256 faceValue,uint256 winProb,bytes32 recipientRandHash,uint256 nonce,uint256 deadline)"
    );
    uint16 private constant _BPS = 10_000;
    uint16 private constant _MAX_FEE_BPS = 2_000;

    /// @notice One stage's signed receipt, as submitted for settlement. The signer (node key) is
    ///         recovered from (r, vs).
    struct StageReceipt {
        uint32 start;
        uint32 end;
        uint32 tokens;
        uint256 amount;
        bytes32 outputHash;
        bytes32 r;
        bytes32 vs;
    }

    /// @notice One job to settle: the client's authorization, its signature and the receipts.
    struct JobSettlement {
        address client;
        bytes32 modelId;
        uint256 maxCost;
        uint256 nonce;
        uint256 deadline;
        bytes32 r;
        bytes32 vs;
        StageReceipt[] receipts;
    }

    /// @notice A standing spending authorization: `spender` may sign job authorizations for the
    ///         client up to `remaining` token units (receipts + fees) until `expiry`.
    struct Spender {
        uint128 remaining;
        uint64 expiry;
    }

    struct PendingWithdrawal {
        uint256 amount;
        uint64 readyAt;
    }

    /// @dev The one slot every settlement reads and writes: the escrow total, the protocol fees
    ///      credited to the current treasury and not yet claimed (so a settlement's fee costs no
    ///      write of its own), and the fee rate. 120 bits hold over 10**18 tokens of 18 decimals.
    struct Totals {
        uint120 escrow;
        uint120 fees;
        uint16 feeBps;
    }

    /// @notice One stage of a job settled by `settleBatchMerkle`: the fields of its `Receipt`
    ///         (no signature: the stage's node signs one `BatchReceipt` over all its leaves) and
    ///         the index of that node in the batch's `NodeBatch` list, packed in one word (calldata
    ///         is most of a batched job's gas): bits 255-224 node index, 223-192 start, 191-160
    ///         end, 159-128 tokens, 127-0 amount (so a Merkle-settled receipt bills < 2**128).
    struct MerkleStage {
        uint256 packed;
        bytes32 outputHash;
    }

    /// @notice One job of a `settleBatchMerkle` batch: the client's authorization, its signature
    ///         and the stages in layer order.
    struct MerkleJob {
        address client;
        bytes32 modelId;
        uint256 maxCost;
        uint256 nonce;
        uint256 deadline;
        bytes32 r;
        bytes32 vs;
        MerkleStage[] stages;
    }

    /// @notice One stage of a `settleJob` job: the fields of its `Receipt` packed in one word as
    ///         in `MerkleStage` (bits 223-192 start, 191-160 end, 159-128 tokens, 127-0 amount;
    ///         bits 255-224 unused), its output hash, and the stage node's compact signature
    ///         (r, vs) over that `Receipt` (the same signature `settleBatch` takes).
    struct SignedStage {
        uint256 packed;
        bytes32 outputHash;
        bytes32 r;
        bytes32 vs;
    }

    /// @notice The job of a `settleJob` call: the client's authorization, its signature and the
    ///         stages in layer order.
    struct SingleJob {
        address client;
        bytes32 modelId;
        uint256 maxCost;
        uint256 nonce;
        uint256 deadline;
        bytes32 r;
        bytes32 vs;
        SignedStage[] stages;
    }

    /// @notice A node's one signature for a whole batch: an EIP-712 `BatchReceipt` over the Merkle
    ///         root of its leaves (each leaf the EIP-712 struct hash of one stage's `Receipt`, in the
    ///         order the stages appear in the batch), their total and count.
    struct NodeBatch {
        address node;
        bytes32 root;
        uint256 total;
        uint32 count;
        bytes32 r;
        bytes32 vs;
    }

    /// @notice A client's probabilistic payment to one node (`PaymentTicket`): it wins when
    ///         keccak256(r, vs, recipientRand) < winProb, and a winning ticket pays `faceValue`
    ///         (= expected value / win probability) from the client's escrow held for `broker`.
    struct PaymentTicket {
        address client;
        address broker;
        address recipient;
        uint256 faceValue;
        uint256 winProb;
        bytes32 recipientRandHash;
        uint256 nonce;
        uint256 deadline;
    }

    /// @dev Per-batch memory cache of nodes already checked and what they are owed. A node that
    ///      was registered but is not routable is cached with operator address(0): its receipts
    ///      are forfeited.
    struct Payees {
        address[] nodes;
        address[] operators;
        uint256[] owed;
        uint256 count;
        bytes32 lastModel;
        uint32 lastModelLayers;
    }

    IERC20 private immutable _token;
    INodeRegistry private immutable _registry;
    uint64 private immutable _withdrawDelay;
    uint64 private immutable _withdrawWindow;
    uint64 private immutable _maxAuthorizationLifetime;
    address private _treasury;

    mapping(address client => mapping(address broker => uint256)) private _escrow;
    mapping(address client => mapping(address broker => PendingWithdrawal)) private _withdrawals;
    mapping(address client => mapping(uint256 word => uint256 bits)) private _nonceBitmap;
    mapping(address account => uint256) private _claimable;
    mapping(address client => mapping(address spender => Spender)) private _spenders;
    mapping(address broker => mapping(bytes32 batchId => bool)) private _batchSettled;
    mapping(bytes32 ticketHash => bool) private _ticketRedeemed;
    /// @dev Escrow total, treasury fees and fee rate in one slot (see `Totals`).
    Totals private _totals;
    /// @dev Everything the contract owes: escrow plus credited earnings. Settlement moves money
    ///      between the two without changing it, so the claimable total is `_held - escrow`
    ///      and settling writes no total of its own.
    uint256 private _held;

    /// @notice Tokens were added to a client's escrow held for `broker`; `escrow` is that part now.
    event Deposited(address indexed client, address indexed broker, address from, uint256 amount, uint256 escrow);
    /// @notice A client asked to withdraw escrow held for `broker`; possible from `readyAt`.
    event WithdrawalRequested(address indexed client, address indexed broker, uint256 amount, uint64 readyAt);
    /// @notice Escrow held for `broker` was paid back to the client.
    event Withdrawn(address indexed client, address indexed broker, uint256 amount);
    /// @notice A client set (or revoked: cap 0 and expiry 0) a standing spending authorization.
    event SpenderSet(address indexed client, address indexed spender, uint256 cap, uint64 expiry);
    /// @notice A receipt was not paid because its signer, a registered node, was not routable at
    ///         settlement (deregistered or under the minimum stake): evidence against that node.
    ///         The client was not charged for it.
    event ReceiptForfeited(bytes32 indexed jobId, address indexed node, uint256 amount);
    /// @notice A job was settled: the client paid `cost` to nodes plus `fee` to the protocol. The
    ///         batch it belongs to is the `BatchSettled` event of the same transaction.
    event JobSettled(bytes32 indexed jobId, address indexed client, uint256 cost, uint256 fee);
    /// @notice A node's operator was credited for receipts in a batch.
    event PaymentCredited(address indexed payee, address indexed node, bytes32 indexed batchId, uint256 amount);
    /// @notice A settlement batch completed; the treasury was credited `fees`.
    event BatchSettled(bytes32 indexed batchId, address indexed broker, uint256 jobs, uint256 paid, uint256 fees);
    /// @notice Credited earnings were paid out.
    event Claimed(address indexed account, uint256 amount);
    /// @notice The protocol fee or treasury changed.
    event FeeChanged(uint16 feeBps, address treasury);
    /// @notice A winning payment ticket was redeemed: `operator` (of node `recipient`) was credited
    ///         `faceValue`, the treasury `fee`, both drawn from the client's escrow held for `broker`.
    event TicketRedeemed(
        bytes32 indexed ticketHash,
        address indexed client,
        address indexed recipient,
        address broker,
        address operator,
        uint256 faceValue,
        uint256 fee
    );

    error JobMarketZeroAmount();
    error JobMarketZeroAddress();
    error JobMarketInvalidFee(uint16 feeBps, uint16 maxFeeBps);
    error JobMarketNoPendingWithdrawal(address client, address broker);
    error JobMarketNotBroker(address account);
    error JobMarketSelfDealing(uint256 jobIndex, uint256 receiptIndex, address node, address operator);
    error JobMarketWithdrawalNotReady(uint64 readyAt, uint64 now_);
    error JobMarketWithdrawalExpired(uint64 readyAt, uint64 expiresAt, uint64 now_);
    error JobMarketInvalidWithdrawWindow(uint64 withdrawWindow);
    error JobMarketInvalidAuthorizationLifetime(uint64 maxAuthorizationLifetime, uint64 withdrawDelay);
    error JobMarketAuthorizationTooLong(uint256 jobIndex, uint256 deadline, uint256 maxDeadline);
    error JobMarketSpenderChanged(address spender, uint256 expectedRemaining, uint256 remaining);
    error JobMarketNothingToClaim(address account);
    error JobMarketEmptyBatch();
    error JobMarketBatchAlreadySettled(bytes32 batchId);
    error JobMarketInvalidClientSignature(uint256 jobIndex, address client, address recovered);
    error JobMarketAuthorizationExpired(uint256 jobIndex, uint256 deadline, uint256 now_);
    error JobMarketSpenderCapExceeded(uint256 jobIndex, address spender, uint256 total, uint256 remaining);
    error JobMarketSpenderExpired(uint256 jobIndex, address spender, uint64 expiry);
    error JobMarketJobAlreadySettled(uint256 jobIndex, address client, uint256 nonce);
    error JobMarketUnknownModel(uint256 jobIndex, bytes32 modelId);
    error JobMarketNoReceipts(uint256 jobIndex);
    error JobMarketInvalidRange(uint256 jobIndex, uint256 receiptIndex, uint32 start, uint32 end, uint32 expectedStart);
    /// @notice Stage `stageIndex` of job `jobIndex` repeats the previous stage's layer range (a
    ///         share of a range served by a group of nodes), but its signer `node` is not greater,
    ///         as an address (uint160), than the previous stage's signer `previous`: a group's
    ///         shares must come in strictly ascending signer order, so no node bills one range
    ///         twice in a job.
    error JobMarketShareOrder(uint256 jobIndex, uint256 stageIndex, address node, address previous);
    error JobMarketIncompleteCoverage(uint256 jobIndex, uint32 coveredTo, uint32 numLayers);
    error JobMarketNodeNotRoutable(uint256 jobIndex, uint256 receiptIndex, address node);
    error JobMarketCostExceedsAuthorization(uint256 jobIndex, uint256 total, uint256 maxCost);
    error JobMarketInsufficientEscrow(
        uint256 jobIndex, address client, address broker, uint256 needed, uint256 available
    );
    error JobMarketUnknownBatchNode(uint256 jobIndex, uint256 stageIndex, uint256 nodeIndex, uint256 nodes);
    error JobMarketDuplicateBatchNode(uint256 nodeIndex, address node);
    error JobMarketBatchNodeNotRegistered(uint256 nodeIndex, address node);
    error JobMarketBatchSelfDealing(uint256 nodeIndex, address node, address operator);
    error JobMarketBatchCountMismatch(uint256 nodeIndex, address node, uint256 leaves, uint256 count);
    error JobMarketBatchTotalMismatch(uint256 nodeIndex, address node, uint256 leavesTotal, uint256 total);
    error JobMarketBatchRootMismatch(uint256 nodeIndex, address node, bytes32 computed, bytes32 signed);
    error JobMarketInvalidBatchSignature(uint256 nodeIndex, address node, address recovered);
    error JobMarketTicketExpired(bytes32 ticketHash, uint256 deadline, uint256 now_);
    error JobMarketTicketTooLong(bytes32 ticketHash, uint256 deadline, uint256 maxDeadline);
    error JobMarketTicketRandMismatch(bytes32 ticketHash, bytes32 committed, bytes32 revealed);
    error JobMarketInvalidTicketSignature(bytes32 ticketHash, address client, address recovered);
    error JobMarketTicketAlreadyRedeemed(bytes32 ticketHash);
    error JobMarketTicketNotWinning(bytes32 ticketHash, uint256 draw, uint256 winProb);
    error JobMarketTicketRecipientNotRoutable(bytes32 ticketHash, address recipient, address operator);
    error JobMarketTicketSelfDealing(bytes32 ticketHash, address recipient, address operator);
    error JobMarketTicketSpenderCapExceeded(bytes32 ticketHash, address spender, uint256 total, uint256 remaining);
    error JobMarketTicketInsufficientEscrow(
        bytes32 ticketHash, address client, address broker, uint256 needed, uint256 available
    );

    /// @param token_ the payment token
    /// @param registry_ the node registry consulted for node keys, stake and model layers
    /// @param admin receives DEFAULT_ADMIN_ROLE (grants BROKER_ROLE)
    /// @param treasury_ receives the protocol fee
    /// @param feeBps_ protocol fee on top of receipts, in basis points (at most 2000)
    /// @param withdrawDelay_ seconds between a withdrawal request and the withdrawal
    /// @param withdrawWindow_ seconds a ready withdrawal request stays usable (at least 1)
    /// @param maxAuthorizationLifetime_ how far ahead of the settling block an authorization's
    ///        deadline may be, in seconds; at least 1 and less than `withdrawDelay_`, so no
    ///        authorization a broker admitted can outlive the withdrawal delay
    constructor(
        IERC20 token_,
        INodeRegistry registry_,
        address admin,
        address treasury_,
        uint16 feeBps_,
        uint64 withdrawDelay_,
        uint64 withdrawWindow_,
        uint64 maxAuthorizationLifetime_
    ) EIP712("DLIS JobMarket", "1") {
        if (
            address(token_) == address(0) || address(registry_) == address(0) || admin == address(0)
                || treasury_ == address(0)
        ) revert JobMarketZeroAddress();
        if (feeBps_ > _MAX_FEE_BPS) revert JobMarketInvalidFee(feeBps_, _MAX_FEE_BPS);
        _token = token_;
        _registry = registry_;
        _treasury = treasury_;
        _totals.feeBps = feeBps_;
        if (withdrawWindow_ == 0) revert JobMarketInvalidWithdrawWindow(withdrawWindow_);
        if (maxAuthorizationLifetime_ == 0 || maxAuthorizationLifetime_ >= withdrawDelay_) {
            revert JobMarketInvalidAuthorizationLifetime(maxAuthorizationLifetime_, withdrawDelay_);
        }
        _withdrawDelay = withdrawDelay_;
        _withdrawWindow = withdrawWindow_;
        _maxAuthorizationLifetime = maxAuthorizationLifetime_;
        _grantRole(DEFAULT_ADMIN_ROLE, admin);
    }

    // ----------------------------------------------------------------------------- escrow

    /// @notice Add `amount` to the caller's escrow held for `broker` (the caller must have
    ///         approved this contract). Only `broker` can settle jobs against it.
    /// @param broker an account holding BROKER_ROLE (others could never settle against it)
    function deposit(address broker, uint256 amount) external nonReentrant {
        _deposit(msg.sender, broker, amount);
    }

    /// @notice Like `deposit`, with an EIP-2612 permit instead of an approval.
    /// @dev A permit that was already used (front-run) is ignored when the allowance suffices.
    function depositWithPermit(address broker, uint256 amount, uint256 deadline, uint8 v, bytes32 r, bytes32 s)
        external
        nonReentrant
    {
        try IERC20Permit(address(_token)).permit(msg.sender, address(this), amount, deadline, v, r, s) {} catch {}
        _deposit(msg.sender, broker, amount);
    }

    /// @notice Ask to withdraw `amount` of the escrow held for `broker` after the withdrawal
    ///         delay. Replaces any earlier request for that broker and restarts the delay. Escrow
    ///         stays usable for settlement until withdrawn. The request can be used from `readyAt`
    ///         to `readyAt + withdrawWindow`, then expires.
    function requestWithdrawal(address broker, uint256 amount) external {
        if (amount == 0) revert JobMarketZeroAmount();
        uint64 readyAt = uint64(block.timestamp) + _withdrawDelay;
        _withdrawals[msg.sender][broker] = PendingWithdrawal(amount, readyAt);
        emit WithdrawalRequested(msg.sender, broker, amount, readyAt);
    }

    /// @notice Withdraw the requested amount (or the whole escrow if less is left) once ready and
    ///         before the request expires (`readyAt + withdrawWindow`). An expired request must be
    ///         made again (and waits the delay again): a ready request cannot be held open to pull
    ///         escrow at any moment from under jobs admitted later.
    function withdraw(address broker) external nonReentrant {
        PendingWithdrawal memory w = _withdrawals[msg.sender][broker];
        if (w.amount == 0) revert JobMarketNoPendingWithdrawal(msg.sender, broker);
        if (block.timestamp < w.readyAt) revert JobMarketWithdrawalNotReady(w.readyAt, uint64(block.timestamp));
        uint64 expiresAt = w.readyAt + _withdrawWindow;
        if (block.timestamp > expiresAt) {
            revert JobMarketWithdrawalExpired(w.readyAt, expiresAt, uint64(block.timestamp));
        }
        uint256 available = _escrow[msg.sender][broker];
        uint256 amount = w.amount < available ? w.amount : available;
        delete _withdrawals[msg.sender][broker];
        _escrow[msg.sender][broker] = available - amount;
        _totals.escrow -= uint120(amount); // amount <= this escrow <= the total
        _held -= amount;
        emit Withdrawn(msg.sender, broker, amount);
        if (amount > 0) _token.safeTransfer(msg.sender, amount);
    }

    /// @notice Let `spender` (e.g. a key held by a broker for an API key) sign job authorizations
    ///         on the caller's behalf, up to `cap` token units in total, until `expiry`. Setting
    ///         it again replaces the remaining cap, only if the remaining cap is still
    ///         `expectedRemaining` (compare-and-set): a spender that draws from the old cap just
    ///         before a lowering lands makes the lowering revert instead of being granted both.
    ///         Cap 0 revokes the spender fully (its signatures are refused from then on).
    /// @param expectedRemaining the remaining cap the caller read (`spenderOf`); 0 for a new spender
    function setSpender(address spender, uint256 expectedRemaining, uint128 cap, uint64 expiry) external {
        if (spender == address(0)) revert JobMarketZeroAddress();
        uint256 remaining = _spenders[msg.sender][spender].remaining;
        if (remaining != expectedRemaining) revert JobMarketSpenderChanged(spender, expectedRemaining, remaining);
        if (cap == 0) {
            _revokeSpender(spender);
            return;
        }
        _spenders[msg.sender][spender] = Spender(cap, expiry);
        emit SpenderSet(msg.sender, spender, cap, expiry);
    }

    /// @notice Revoke `spender` fully, whatever its remaining cap: its signatures are refused
    ///         from this block on, also for jobs that would cost nothing.
    function revokeSpender(address spender) external {
        if (spender == address(0)) revert JobMarketZeroAddress();
        _revokeSpender(spender);
    }

    // ----------------------------------------------------------------------------- settlement

    /// @notice Settle a batch of jobs. Broker only; every authorization must name the caller as
    ///         broker and have a deadline at most `maxAuthorizationLifetime` ahead. The whole
    ///         batch reverts on the first invalid job (the error names its index), so a broker
    ///         simulates first and drops what fails. Receipts of registered nodes that are no
    ///         longer routable are forfeited (`ReceiptForfeited`), not paid and not charged.
    ///         A job's receipts cover its model's layers in order; a receipt after the first may
    ///         repeat exactly the previous receipt's range (a share of a range served by a group
    ///         of nodes) when its recovered signer is greater, as an address, than the previous
    ///         receipt's, else `JobMarketShareOrder`; each share is credited to its own node.
    /// @param batchId caller-chosen id of this batch, unique per broker (a broker's batch id
    ///        settles once; other brokers' ids never collide with it)
    /// @param jobs the jobs with their client authorization and stage receipts
    function settleBatch(bytes32 batchId, JobSettlement[] calldata jobs) external onlyRole(BROKER_ROLE) nonReentrant {
        if (jobs.length == 0) revert JobMarketEmptyBatch();
        mapping(bytes32 => bool) storage settled = _batchSettled[msg.sender];
        if (settled[batchId]) revert JobMarketBatchAlreadySettled(batchId);
        settled[batchId] = true;

        uint256 receiptCount = 0;
        for (uint256 i = 0; i < jobs.length; ++i) {
            receiptCount += jobs[i].receipts.length;
        }
        Payees memory payees =
            Payees(new address[](receiptCount), new address[](receiptCount), new uint256[](receiptCount), 0, 0, 0);

        Totals memory totals = _totals;
        uint256 paid = 0;
        uint256 fees = 0;
        for (uint256 i = 0; i < jobs.length; ++i) {
            (uint256 cost, uint256 fee) = _settleJob(i, jobs[i], totals.feeBps, payees);
            paid += cost;
            fees += fee;
        }
        for (uint256 k = 0; k < payees.count; ++k) {
            address operator = payees.operators[k];
            if (operator == address(0)) continue; // forfeited: nothing owed
            _claimable[operator] += payees.owed[k];
            emit PaymentCredited(operator, payees.nodes[k], batchId, payees.owed[k]);
        }
        _moveToClaimable(totals, paid, fees);
        emit BatchSettled(batchId, msg.sender, jobs.length, paid, fees);
    }

    /// @notice Settle a batch in which each node signs ONE `BatchReceipt` for all its stages,
    ///         instead of one `Receipt` per stage: per job the contract checks the client's
    ///         authorization (signature, nonce, deadline and lifetime), coverage of the model's
    ///         layers, cost + fee <= maxCost and escrow exactly as `settleBatch`; per node it
    ///         rebuilds the Merkle root of the node's leaves (each the EIP-712 struct hash of the
    ///         stage's `Receipt`, in batch order; see `_merkleRoot`) and checks their count, total,
    ///         root and the node's signature over (node, caller, batchId, root, total, count), then
    ///         credits the node's operator once. Every node is paid exactly its leaves' amounts and
    ///         every client charged exactly its jobs' receipts plus fee. Receipts of registered
    ///         nodes that are not routable are forfeited (`ReceiptForfeited`), as in `settleBatch`.
    ///         Shared ranges as in `settleBatch`: a stage may repeat exactly the previous stage's
    ///         range when the node at its index is greater, as an address, than the previous
    ///         stage's node (`JobMarketShareOrder` otherwise).
    ///         A job settles once (nonce bitmap); a batch id is not recorded on chain (a node's
    ///         signature binds the batch id, and a replayed batch reverts on its first job's nonce):
    ///         `batchSettled` stays false for these batches, `BatchSettled` is the record.
    /// @param batchId caller-chosen id of this batch; nodes sign it
    /// @param nodes every node with stages in the batch, with its batch receipt (no duplicates)
    /// @param jobs the jobs; each stage names its node by index into `nodes`
    function settleBatchMerkle(bytes32 batchId, NodeBatch[] calldata nodes, MerkleJob[] calldata jobs)
        external
        onlyRole(BROKER_ROLE)
        nonReentrant
    {
        if (jobs.length == 0) revert JobMarketEmptyBatch();
        Tally memory tally = _openTally(nodes, jobs[0].modelId);
        Totals memory totals = _totals;
        uint256 paid = 0;
        uint256 fees = 0;
        for (uint256 i = 0; i < jobs.length; ++i) {
            (uint256 cost, uint256 fee) = _settleMerkleJob(i, jobs[i], totals.feeBps, nodes, tally);
            paid += cost;
            fees += fee;
        }
        _closeTally(batchId, nodes, tally);
        _moveToClaimable(totals, paid, fees);
        emit BatchSettled(batchId, msg.sender, jobs.length, paid, fees);
    }

    /// @notice Settle one job alone: the cheapest path for a single job. The same checks,
    ///         payments and events as `settleBatch` with a batch of one (the client's
    ///         authorization: signature, nonce, deadline and lifetime; every stage's `Receipt`
    ///         signed by a registered node; coverage of the model's layers [0, numLayers);
    ///         receipts + fee <= maxCost; escrow held for the caller; no self-dealing; receipts
    ///         of registered nodes that are not routable forfeited with `ReceiptForfeited`), with
    ///         the stages packed one word each (see `SignedStage`; amounts < 2**128), the nodes and
    ///         the model looked up in one registry call, and no batch id taken or stored: the
    ///         batch id of a job settled alone is `soloBatchId(jobId)` = keccak256(jobId) (what
    ///         the broker's ledger names a batch of that one job), carried by its
    ///         `PaymentCredited` events. As in `settleBatchMerkle`, the job's nonce is the replay
    ///         guard (a replay reverts `JobMarketJobAlreadySettled`) and `batchSettled` stays
    ///         false; there is no batch, so no `BatchSettled`: the job's `JobSettled` event (from
    ///         this broker's transaction) is the record. Errors name job index 0. Each paid stage
    ///         credits its node's operator (`PaymentCredited`, one per stage). Shared ranges as in
    ///         `settleBatch`: a stage may repeat exactly the previous stage's range when its signer
    ///         is greater, as an address, than the previous stage's (`JobMarketShareOrder`
    ///         otherwise).
    /// @param job the job: the client's authorization and its signature, the signed stages
    function settleJob(SingleJob calldata job) external onlyRole(BROKER_ROLE) nonReentrant {
        address client = job.client;
        Totals memory totals = _totals;
        bytes32 domain = _domainSeparatorV4(); // for all of the job's digests
        (bytes32 jobId, address signer) = _consumeAuthorization(
            0, client, job.modelId, job.maxCost, job.nonce, job.deadline, job.r, job.vs, domain
        );
        bytes32 batchId = soloBatchId(jobId);
        uint256 cost = _payStages(batchId, job.stages, job.modelId, jobId, domain);
        uint256 fee = _bill(0, client, signer, job.maxCost, jobId, cost, totals.feeBps);
        _moveToClaimable(totals, cost, fee);
    }

    /// @notice Redeem a winning probabilistic payment ticket: credits `faceValue` to the operator
    ///         of the ticket's recipient node and the protocol fee on it to the treasury, both
    ///         drawn from the client's escrow held for the ticket's broker. Anyone may submit it
    ///         (the money only goes to the recipient's operator). The ticket must be signed by the
    ///         client (or a spender of the client, within its cap), not expired and not living
    ///         longer than `maxAuthorizationLifetime`, revealed with the recipient's random number
    ///         (committed as `recipientRandHash`), winning (keccak256(r, vs, recipientRand) <
    ///         winProb), and redeemed once.
    /// @param t the ticket as the client signed it
    /// @param r the client's compact signature, first half
    /// @param vs the client's compact signature, second half
    /// @param recipientRand the recipient's random number; keccak256(abi.encode(recipientRand)) is committed in the ticket
    function redeemWinningTicket(PaymentTicket calldata t, bytes32 r, bytes32 vs, uint256 recipientRand)
        external
        nonReentrant
    {
        bytes32 ticketHash = _hashTypedDataV4(
            keccak256(
                abi.encode(
                    PAYMENT_TICKET_TYPEHASH,
                    t.client,
                    t.broker,
                    t.recipient,
                    t.faceValue,
                    t.winProb,
                    t.recipientRandHash,
                    t.nonce,
                    t.deadline
                )
            )
        );
        if (block.timestamp > t.deadline) revert JobMarketTicketExpired(ticketHash, t.deadline, block.timestamp);
        uint256 maxDeadline = block.timestamp + _maxAuthorizationLifetime;
        if (t.deadline > maxDeadline) revert JobMarketTicketTooLong(ticketHash, t.deadline, maxDeadline);
        bytes32 revealed = keccak256(abi.encode(recipientRand));
        if (revealed != t.recipientRandHash) {
            revert JobMarketTicketRandMismatch(ticketHash, t.recipientRandHash, revealed);
        }
        address signer = _recover(ticketHash, r, vs);
        if (signer != t.client && _spenders[t.client][signer].expiry == 0) {
            revert JobMarketInvalidTicketSignature(ticketHash, t.client, signer);
        }
        if (_ticketRedeemed[ticketHash]) revert JobMarketTicketAlreadyRedeemed(ticketHash);
        uint256 draw = uint256(keccak256(abi.encodePacked(r, vs, recipientRand)));
        if (draw >= t.winProb) revert JobMarketTicketNotWinning(ticketHash, draw, t.winProb);
        (address operator, bool routable) = _registry.settlementInfo(t.recipient);
        if (!routable) revert JobMarketTicketRecipientNotRoutable(ticketHash, t.recipient, operator);
        if (t.recipient == t.broker || operator == t.broker) {
            revert JobMarketTicketSelfDealing(ticketHash, t.recipient, operator);
        }
        Totals memory totals = _totals;
        uint256 fee = (t.faceValue * totals.feeBps) / _BPS;
        uint256 total = t.faceValue + fee;
        if (signer != t.client) {
            Spender storage sp = _spenders[t.client][signer];
            if (block.timestamp > sp.expiry || total > sp.remaining) {
                revert JobMarketTicketSpenderCapExceeded(ticketHash, signer, total, sp.remaining);
            }
            sp.remaining -= uint128(total);
        }
        mapping(address => uint256) storage part = _escrow[t.client];
        uint256 escrow = part[t.broker];
        if (escrow < total) revert JobMarketTicketInsufficientEscrow(ticketHash, t.client, t.broker, total, escrow);
        _ticketRedeemed[ticketHash] = true;
        part[t.broker] = escrow - total;
        _claimable[operator] += t.faceValue;
        _moveToClaimable(totals, t.faceValue, fee);
        emit TicketRedeemed(ticketHash, t.client, t.recipient, t.broker, operator, t.faceValue, fee);
    }

    /// @notice Pay out everything credited to the caller (node earnings, protocol fees).
    function claim() external nonReentrant {
        uint256 amount = _claimable[msg.sender];
        if (msg.sender == _treasury) {
            uint256 fees = _totals.fees;
            if (fees > 0) {
                amount += fees;
                _totals.fees = 0;
            }
        }
        if (amount == 0) revert JobMarketNothingToClaim(msg.sender);
        _claimable[msg.sender] = 0;
        _held -= amount; // amount <= what is owed
        emit Claimed(msg.sender, amount);
        _token.safeTransfer(msg.sender, amount);
    }

    /// @notice Change the protocol fee and treasury.
    function setFee(uint16 feeBps_, address treasury_) external onlyRole(DEFAULT_ADMIN_ROLE) {
        if (feeBps_ > _MAX_FEE_BPS) revert JobMarketInvalidFee(feeBps_, _MAX_FEE_BPS);
        if (treasury_ == address(0)) revert JobMarketZeroAddress();
        Totals memory totals = _totals;
        // the fees credited so far stay the old treasury's (as if credited to its balance then)
        if (totals.fees > 0) _claimable[_treasury] += totals.fees;
        _totals = Totals(totals.escrow, 0, feeBps_);
        _treasury = treasury_;
        emit FeeChanged(feeBps_, treasury_);
    }

    // ----------------------------------------------------------------------------- views

    /// @notice Job id of a client's authorization nonce: keccak256(abi.encode(client, nonce)).
    function jobIdOf(address client, uint256 nonce) public pure returns (bytes32 id) {
        assembly ("memory-safe") {
            // keccak256(abi.encode(client, nonce)) in the scratch space (no allocation per job)
            mstore(0x00, and(client, 0xffffffffffffffffffffffffffffffffffffffff))
            mstore(0x20, nonce)
            id := keccak256(0x00, 0x40)
        }
    }

    /// @notice The batch id that `settleJob`'s `PaymentCredited` events carry for the job `jobId`
    ///         settled alone: keccak256(jobId), what the broker's ledger names a batch of one job.
    function soloBatchId(bytes32 jobId) public pure returns (bytes32 id) {
        assembly ("memory-safe") {
            mstore(0x00, jobId)
            id := keccak256(0x00, 0x20)
        }
    }

    /// @notice Whether a (client, nonce) authorization has been settled.
    function nonceUsed(address client, uint256 nonce) external view returns (bool) {
        return _nonceBitmap[client][nonce >> 8] & (1 << (nonce & 0xff)) != 0;
    }

    /// @notice Remaining cap and expiry of a client's standing spending authorization.
    function spenderOf(address client, address spender) external view returns (uint256 remaining, uint64 expiry) {
        Spender memory sp = _spenders[client][spender];
        return (sp.remaining, sp.expiry);
    }

    /// @notice Whether `broker` has settled a batch with this id (batch ids are per broker).
    function batchSettled(address broker, bytes32 batchId) external view returns (bool) {
        return _batchSettled[broker][batchId];
    }

    /// @notice A client's escrow held for `broker` (what `broker` can settle against).
    function escrowOf(address client, address broker) external view returns (uint256) {
        return _escrow[client][broker];
    }

    /// @notice A client's pending withdrawal request of escrow held for `broker`: usable from
    ///         `readyAt` to `expiresAt` inclusive (all zero when there is none).
    function pendingWithdrawal(address client, address broker)
        external
        view
        returns (uint256 amount, uint64 readyAt, uint64 expiresAt)
    {
        PendingWithdrawal memory w = _withdrawals[client][broker];
        if (w.amount == 0) return (0, 0, 0);
        return (w.amount, w.readyAt, w.readyAt + _withdrawWindow);
    }

    /// @notice Whether a payment ticket (by its EIP-712 digest) was redeemed.
    function ticketRedeemed(bytes32 ticketHash) external view returns (bool) {
        return _ticketRedeemed[ticketHash];
    }

    /// @notice Earnings credited to `account` and not yet claimed.
    function claimableOf(address account) external view returns (uint256) {
        uint256 amount = _claimable[account];
        if (account == _treasury) amount += _totals.fees;
        return amount;
    }

    /// @notice Sum of all escrow balances.
    function totalEscrow() external view returns (uint256) {
        return _totals.escrow;
    }

    /// @notice Sum of all credited, unclaimed earnings.
    function totalClaimable() external view returns (uint256) {
        return _held - _totals.escrow;
    }

    /// @notice Protocol fee in basis points, charged to the client on top of the receipts.
    function feeBps() external view returns (uint16) {
        return _totals.feeBps;
    }

    /// @notice Receiver of protocol fees.
    function treasury() external view returns (address) {
        return _treasury;
    }

    /// @notice Seconds between a withdrawal request and the withdrawal.
    function withdrawDelay() external view returns (uint64) {
        return _withdrawDelay;
    }

    /// @notice Seconds a ready withdrawal request stays usable before it expires.
    function withdrawWindow() external view returns (uint64) {
        return _withdrawWindow;
    }

    /// @notice The most seconds an authorization's deadline may lie ahead of the settling block
    ///         (less than `withdrawDelay`).
    function maxAuthorizationLifetime() external view returns (uint64) {
        return _maxAuthorizationLifetime;
    }

    /// @notice The payment token.
    function token() external view returns (IERC20) {
        return _token;
    }

    /// @notice The node registry used to check receipt signers.
    function registry() external view returns (INodeRegistry) {
        return _registry;
    }

    /// @notice The EIP-712 domain separator for authorizations and receipts.
    function domainSeparator() external view returns (bytes32) {
        return _domainSeparatorV4();
    }

    // ----------------------------------------------------------------------------- internals

    function _revokeSpender(address spender) private {
        delete _spenders[msg.sender][spender];
        emit SpenderSet(msg.sender, spender, 0, 0);
    }

    function _deposit(address client, address broker, uint256 amount) private {
        if (amount == 0) revert JobMarketZeroAmount();
        if (!hasRole(BROKER_ROLE, broker)) revert JobMarketNotBroker(broker);
        uint256 escrow = _escrow[client][broker] + amount;
        _escrow[client][broker] = escrow;
        _totals.escrow += SafeCast.toUint120(amount);
        _held += amount;
        emit Deposited(client, broker, msg.sender, amount, escrow);
        _token.safeTransferFrom(client, address(this), amount);
    }

    function _settleJob(uint256 index, JobSettlement calldata job, uint16 feeBps, Payees memory payees)
        private
        returns (uint256 cost, uint256 fee)
    {
        (bytes32 jobId, address signer) = _consumeAuthorization(
            index, job.client, job.modelId, job.maxCost, job.nonce, job.deadline, job.r, job.vs, _domainSeparatorV4()
        );
        cost = _checkReceipts(index, job, jobId, payees);
        fee = _bill(index, job.client, signer, job.maxCost, jobId, cost, feeBps);
    }

    /// @dev Checks deadline and signature (the client's, or a spender's with a standing
    ///      authorization), marks the nonce used, returns the job id and the signer. A deadline
    ///      more than `maxAuthorizationLifetime` ahead is refused, so an authorization settles
    ///      within that lifetime of its deadline, before a withdrawal requested after the broker
    ///      admitted it can be ready (see the contract notes).
    function _consumeAuthorization(
        uint256 index,
        address client,
        bytes32 modelId,
        uint256 maxCost,
        uint256 nonce,
        uint256 deadline,
        bytes32 r,
        bytes32 vs,
        bytes32 domain
    ) private returns (bytes32, address) {
        if (block.timestamp > deadline) revert JobMarketAuthorizationExpired(index, deadline, block.timestamp);
        uint256 maxDeadline = block.timestamp + _maxAuthorizationLifetime;
        if (deadline > maxDeadline) revert JobMarketAuthorizationTooLong(index, deadline, maxDeadline);
        bytes32 typeHash = JOB_AUTHORIZATION_TYPEHASH;
        bytes32 structHash;
        assembly ("memory-safe") {
            // keccak256(abi.encode(typeHash, client, msg.sender, modelId, maxCost, nonce, deadline)),
            // in scratch memory past the free memory pointer (no allocation per job)
            let p := mload(0x40)
            mstore(p, typeHash)
            mstore(add(p, 0x20), and(client, 0xffffffffffffffffffffffffffffffffffffffff))
            mstore(add(p, 0x40), caller())
            mstore(add(p, 0x60), modelId)
            mstore(add(p, 0x80), maxCost)
            mstore(add(p, 0xa0), nonce)
            mstore(add(p, 0xc0), deadline)
            structHash := keccak256(p, 0xe0)
        }
        bytes32 authHash = MessageHashUtils.toTypedDataHash(domain, structHash);
        address signer = _recover(authHash, r, vs);
        if (signer != client && _spenders[client][signer].expiry == 0) {
            revert JobMarketInvalidClientSignature(index, client, signer);
        }
        mapping(uint256 => uint256) storage bitmap = _nonceBitmap[client];
        uint256 bit = 1 << (nonce & 0xff);
        uint256 word = bitmap[nonce >> 8];
        if (word & bit != 0) revert JobMarketJobAlreadySettled(index, client, nonce);
        bitmap[nonce >> 8] = word | bit;
        return (jobIdOf(client, nonce), signer);
    }

    /// @dev Charges the client (or its spender) cost + fee and records the job.
    function _bill(
        uint256 index,
        address client,
        address signer,
        uint256 maxCost,
        bytes32 jobId,
        uint256 cost,
        uint16 feeBps
    ) private returns (uint256 fee) {
        fee = (cost * feeBps) / _BPS;
        if (signer != client) _spend(index, client, signer, cost + fee);
        _charge(index, client, maxCost, cost + fee);
        emit JobSettled(jobId, client, cost, fee);
    }

    /// @dev Draws `total` from a spender's standing authorization.
    function _spend(uint256 index, address client, address spender, uint256 total) private {
        Spender storage sp = _spenders[client][spender];
        if (block.timestamp > sp.expiry) revert JobMarketSpenderExpired(index, spender, sp.expiry);
        if (total > sp.remaining) revert JobMarketSpenderCapExceeded(index, spender, total, sp.remaining);
        sp.remaining -= uint128(total);
    }

    /// @dev Debits `total` from the client's escrow held for the settling broker, within the
    ///      authorized maximum.
    function _charge(uint256 index, address client, uint256 maxCost, uint256 total) private {
        if (total > maxCost) revert JobMarketCostExceedsAuthorization(index, total, maxCost);
        mapping(address => uint256) storage part = _escrow[client];
        uint256 escrow = part[msg.sender];
        if (escrow < total) revert JobMarketInsufficientEscrow(index, client, msg.sender, total, escrow);
        part[msg.sender] = escrow - total;
    }

    /// @dev Takes `paid` (credited to operators) + `fees` (credited to the treasury) off the
    ///      escrow total `t` read before settling and writes the slot once. paid + fees <= what was
    ///      debited from escrow parts <= the escrow total, so the casts are exact and the claimable
    ///      total (`_held - escrow`) grows by exactly paid + fees.
    function _moveToClaimable(Totals memory t, uint256 paid, uint256 fees) private {
        uint256 escrow = t.escrow - (paid + fees);
        uint256 feeTotal = SafeCast.toUint120(t.fees + fees); // fees owed, backed by tokens held
        uint256 feeBps_ = t.feeBps;
        assembly ("memory-safe") {
            // one SSTORE of the whole slot (assigning the struct stores it field by field): escrow
            // in bits 0-119, fees 120-239, feeBps 240-255, as `Totals` lays them out
            sstore(_totals.slot, or(escrow, or(shl(120, feeTotal), shl(240, feeBps_))))
        }
    }

    /// @dev Checks ranges, coverage and signatures; returns what the client pays for receipts
    ///      (forfeited receipts excluded).
    function _checkReceipts(uint256 index, JobSettlement calldata job, bytes32 jobId, Payees memory payees)
        private
        returns (uint256 cost)
    {
        StageReceipt[] calldata receipts = job.receipts; // decoded once, not per access
        uint256 n = receipts.length;
        if (n == 0) revert JobMarketNoReceipts(index);
        uint32 numLayers;
        if (job.modelId == payees.lastModel && payees.lastModelLayers != 0) {
            numLayers = payees.lastModelLayers;
        } else {
            numLayers = _registry.modelLayers(job.modelId);
            if (numLayers == 0) revert JobMarketUnknownModel(index, job.modelId);
            payees.lastModel = job.modelId;
            payees.lastModelLayers = numLayers;
        }
        // the previous stage's signer << 64 | its range (see `_nextStage`), one word for shares
        uint256 prev = 0;
        for (uint256 j = 0; j < n; ++j) {
            StageReceipt calldata rc = receipts[j];
            uint64 range = (uint64(rc.start) << 32) | rc.end;
            bool share = _nextStage(index, j, range, uint64(prev), numLayers);
            address node = _recover(_hashTypedDataV4(_receiptHash(jobId, job.modelId, rc)), rc.r, rc.vs);
            if (share) _requireShareOrder(index, j, node, address(uint160(prev >> 64)));
            prev = (uint256(uint160(node)) << 64) | range;
            if (_credit(payees, node, rc.amount, index, j)) {
                cost += rc.amount;
            } else {
                emit ReceiptForfeited(jobId, node, rc.amount);
            }
        }
        _requireCovered(index, uint32(prev), numLayers);
    }

    /// @dev The coverage rule every settlement path applies to a job's stages, in order. `range`
    ///      is stage `j`'s layer range [start, end) packed as start << 32 | end (the bits 223-160
    ///      of a packed stage word), `prev` the previous stage's (0 before the first), so
    ///      `uint32(prev)` is where the stages cover to so far. A stage starts where the previous
    ///      one ended (layer 0 for the first), is not empty and ends within the model's
    ///      `numLayers`; or it is a share (returns true): it repeats exactly the previous stage's
    ///      range (a range served by a group of nodes, each billing its own share with its own
    ///      receipt), and the caller then requires its signer to be greater, as an address, than
    ///      the previous stage's (`_requireShareOrder`). Anything else (a gap, a partial overlap,
    ///      a repeat of an older range) reverts `JobMarketInvalidRange`. The first stage is never a
    ///      share (`prev` = 0 is the empty range [0, 0), which fails the first rule). Only a stage
    ///      that does not start where the previous one ended takes the share branch; the callers
    ///      read a share's signers only then.
    function _nextStage(uint256 index, uint256 j, uint64 range, uint64 prev, uint32 numLayers)
        private
        pure
        returns (bool share)
    {
        uint32 start = uint32(range >> 32);
        uint32 end = uint32(range);
        uint32 coveredTo = uint32(prev);
        if (start == coveredTo) {
            if (end <= start || end > numLayers) revert JobMarketInvalidRange(index, j, start, end, coveredTo);
            return false;
        }
        // a share repeats the previous range exactly, which was checked non-empty and in range
        if (range != prev) revert JobMarketInvalidRange(index, j, start, end, coveredTo);
        return true;
    }

    /// @dev A share's signer `node` must be greater, as an address, than the previous stage's
    ///      signer `previous` (so a group's members come in ascending order and none bills one
    ///      range twice).
    function _requireShareOrder(uint256 index, uint256 j, address node, address previous) private pure {
        if (uint160(node) <= uint160(previous)) revert JobMarketShareOrder(index, j, node, previous);
    }

    /// @dev After the last stage: the stages together cover every layer [0, numLayers).
    function _requireCovered(uint256 index, uint32 coveredTo, uint32 numLayers) private pure {
        if (coveredTo != numLayers) revert JobMarketIncompleteCoverage(index, coveredTo, numLayers);
    }

    /// @dev Adds `amount` to what `node` is owed in this batch and returns true, or returns false
    ///      when the receipt is forfeited (the node is registered but not routable now). A signer
    ///      that was never registered (a forged or foreign receipt) reverts the job.
    function _credit(Payees memory payees, address node, uint256 amount, uint256 index, uint256 j)
        private
        view
        returns (bool)
    {
        for (uint256 k = 0; k < payees.count; ++k) {
            if (payees.nodes[k] == node) {
                if (payees.operators[k] == address(0)) return false;
                payees.owed[k] += amount;
                return true;
            }
        }
        (address operator, bool routable) = _registry.settlementInfo(node);
        if (operator == address(0)) revert JobMarketNodeNotRoutable(index, j, node);
        if (node == msg.sender || operator == msg.sender) revert JobMarketSelfDealing(index, j, node, operator);
        uint256 c = payees.count;
        payees.nodes[c] = node;
        payees.count = c + 1;
        if (!routable) return false;
        payees.operators[c] = operator;
        payees.owed[c] = amount;
        return true;
    }

    /// @dev `ECDSA.recover(digest, r, vs)` for an EIP-2098 compact signature, with its checks and
    ///      errors (s in the lower half order, else `ECDSAInvalidSignatureS`, malleable; no signer,
    ///      else `ECDSAInvalidSignature`), calling the ecrecover precompile on scratch memory
    ///      instead of through OpenZeppelin's error-enum plumbing: it runs four times per job.
    function _recover(bytes32 digest, bytes32 r, bytes32 vs) private view returns (address signer) {
        bytes32 s = vs & bytes32(0x7fffffffffffffffffffffffffffffffffffffffffffffffffffffffffffffff);
        if (uint256(s) > 0x7FFFFFFFFFFFFFFFFFFFFFFFFFFFFFFF5D576E7357A4501DDFE92F46681B20A0) {
            revert ECDSA.ECDSAInvalidSignatureS(s);
        }
        assembly ("memory-safe") {
            let p := mload(0x40) // past the free memory pointer: not allocated, only read back below
            mstore(p, digest)
            mstore(add(p, 0x20), add(shr(255, vs), 27)) // v from the top bit of vs
            mstore(add(p, 0x40), r)
            mstore(add(p, 0x60), s)
            mstore(0x00, 0) // the precompile writes nothing for an invalid signature
            pop(staticcall(gas(), 0x01, p, 0x80, 0x00, 0x20))
            signer := mload(0x00)
        }
        if (signer == address(0)) revert ECDSA.ECDSAInvalidSignature();
    }

    /// @dev `_checkReceipts` of `settleJob`, crediting as it goes: recovers every stage's signer,
    ///      looks them and the model up in one registry call, then per stage checks range,
    ///      registration and self-dealing and credits the operator (`PaymentCredited`, one per paid
    ///      stage) or forfeits the receipt; finally checks coverage. Returns what the client pays.
    ///      No external call follows the registry's (a view), and any failed check reverts all.
    function _payStages(
        bytes32 batchId,
        SignedStage[] calldata stages,
        bytes32 modelId,
        bytes32 jobId,
        bytes32 domain
    ) private returns (uint256 cost) {
        uint256 n = stages.length;
        if (n == 0) revert JobMarketNoReceipts(0);
        address[] memory nodes = new address[](n);
        for (uint256 j = 0; j < n; ++j) {
            SignedStage calldata st = stages[j];
            bytes32 leaf = _receiptLeaf(jobId, modelId, st.packed, st.outputHash);
            bytes32 digest = MessageHashUtils.toTypedDataHash(domain, leaf);
            nodes[j] = _recover(digest, st.r, st.vs);
        }
        (uint32 numLayers, uint256[] memory info) = _registry.settlementInfoOf(modelId, nodes);
        if (numLayers == 0) revert JobMarketUnknownModel(0, modelId);
        uint64 prev = 0; // the previous stage's range (see `_nextStage`); its signer is nodes[j - 1]
        for (uint256 j = 0; j < n; ++j) {
            uint256 w = stages[j].packed;
            uint64 range = uint64(w >> 160);
            if (_nextStage(0, j, range, prev, numLayers)) _requireShareOrder(0, j, nodes[j], nodes[j - 1]); // j > 0
            prev = range;
            address node = nodes[j];
            uint256 entry = info[j];
            address operator = address(uint160(entry));
            if (operator == address(0)) revert JobMarketNodeNotRoutable(0, j, node);
            if (node == msg.sender || operator == msg.sender) revert JobMarketSelfDealing(0, j, node, operator);
            uint256 amount = uint128(w);
            if (entry & ROUTABLE_BIT == 0) {
                emit ReceiptForfeited(jobId, node, amount);
                continue;
            }
            // amounts are below 2**128 and a job has far fewer than 2**128 stages: no overflow
            unchecked {
                cost += amount;
            }
            if (amount == 0) continue;
            _claimable[operator] += amount;
            emit PaymentCredited(operator, node, batchId, amount);
        }
        _requireCovered(0, uint32(prev), numLayers);
    }


    /// @dev Per-batch memory state of `settleBatchMerkle`, one entry per `nodes` index: the
    ///      node's operator (zero when its receipts are forfeited), its leaves so far (sized by the
    ///      signed count), how many were filled and their amounts' sum; plus the last model's layers.
    struct Tally {
        address[] operators;
        bytes32[][] leaves;
        uint256[] filled;
        uint256[] sums;
        bytes32 lastModel;
        uint32 lastModelLayers;
    }

    /// @dev Looks every batch node (registered, not the caller, not listed twice) and the first
    ///      job's model up, in one registry call.
    function _openTally(NodeBatch[] calldata nodes, bytes32 firstModel) private view returns (Tally memory tally) {
        uint256 k = nodes.length;
        address[] memory keys = new address[](k);
        for (uint256 i = 0; i < k; ++i) {
            keys[i] = nodes[i].node;
        }
        (uint32 numLayers, uint256[] memory info) = _registry.settlementInfoOf(firstModel, keys);
        tally = Tally(new address[](k), new bytes32[][](k), new uint256[](k), new uint256[](k), firstModel, numLayers);
        for (uint256 i = 0; i < k; ++i) {
            address node = keys[i];
            for (uint256 j = 0; j < i; ++j) {
                if (keys[j] == node) revert JobMarketDuplicateBatchNode(i, node);
            }
            address operator = address(uint160(info[i]));
            bool routable = info[i] & ROUTABLE_BIT != 0;
            if (operator == address(0)) revert JobMarketBatchNodeNotRegistered(i, node);
            if (node == msg.sender || operator == msg.sender) revert JobMarketBatchSelfDealing(i, node, operator);
            if (routable) tally.operators[i] = operator;
            tally.leaves[i] = new bytes32[](nodes[i].count);
        }
    }

    function _settleMerkleJob(
        uint256 index,
        MerkleJob calldata job,
        uint16 feeBps,
        NodeBatch[] calldata nodes,
        Tally memory tally
    ) private returns (uint256 cost, uint256 fee) {
        (bytes32 jobId, address signer) = _consumeAuthorization(
            index, job.client, job.modelId, job.maxCost, job.nonce, job.deadline, job.r, job.vs, _domainSeparatorV4()
        );
        uint256 n = job.stages.length;
        if (n == 0) revert JobMarketNoReceipts(index);
        uint32 numLayers = tally.lastModelLayers;
        if (job.modelId != tally.lastModel || numLayers == 0) {
            numLayers = _registry.modelLayers(job.modelId);
            if (numLayers == 0) revert JobMarketUnknownModel(index, job.modelId);
            tally.lastModel = job.modelId;
            tally.lastModelLayers = numLayers;
        }
        uint64 prev = 0; // the previous stage's range (see `_nextStage`)
        bytes32 modelId = job.modelId;
        for (uint256 j = 0; j < n; ++j) {
            MerkleStage calldata st = job.stages[j];
            uint256 w = st.packed;
            uint64 range = uint64(w >> 160);
            bool share = _nextStage(index, j, range, prev, numLayers);
            prev = range;
            uint256 k = w >> 224;
            if (k >= nodes.length) revert JobMarketUnknownBatchNode(index, j, k, nodes.length);
            if (share) {
                // the signers: the nodes at this stage's index and the previous stage's (checked
                // above in its iteration), distinct per index (`_openTally` refuses duplicates)
                uint256 prevK = job.stages[j - 1].packed >> 224;
                _requireShareOrder(index, j, nodes[k].node, nodes[prevK].node);
            }
            uint256 amount = uint128(w);
            bytes32[] memory leaves = tally.leaves[k];
            uint256 f = tally.filled[k];
            if (f == leaves.length) revert JobMarketBatchCountMismatch(k, nodes[k].node, f + 1, leaves.length);
            leaves[f] = _receiptLeaf(jobId, modelId, w, st.outputHash);
            // amounts are below 2**128 and a batch holds far fewer than 2**128 stages: no overflow
            unchecked {
                tally.filled[k] = f + 1;
                tally.sums[k] += amount;
                if (tally.operators[k] != address(0)) {
                    cost += amount;
                } else {
                    emit ReceiptForfeited(jobId, nodes[k].node, amount);
                }
            }
        }
        _requireCovered(index, uint32(prev), numLayers);
        fee = _bill(index, job.client, signer, job.maxCost, jobId, cost, feeBps);
    }

    /// @dev Checks each node's count, total, root and signature, then credits its operator once.
    function _closeTally(bytes32 batchId, NodeBatch[] calldata nodes, Tally memory tally) private {
        for (uint256 i = 0; i < nodes.length; ++i) {
            NodeBatch calldata nb = nodes[i];
            uint256 filled = tally.filled[i];
            if (filled != nb.count) revert JobMarketBatchCountMismatch(i, nb.node, filled, nb.count);
            uint256 sum = tally.sums[i];
            if (sum != nb.total) revert JobMarketBatchTotalMismatch(i, nb.node, sum, nb.total);
            bytes32 root = _merkleRoot(tally.leaves[i]);
            if (root != nb.root) revert JobMarketBatchRootMismatch(i, nb.node, root, nb.root);
            bytes32 digest = _hashTypedDataV4(
                keccak256(abi.encode(BATCH_RECEIPT_TYPEHASH, nb.node, msg.sender, batchId, root, sum, nb.count))
            );
            address recovered = _recover(digest, nb.r, nb.vs);
            if (recovered != nb.node) revert JobMarketInvalidBatchSignature(i, nb.node, recovered);
            address operator = tally.operators[i];
            if (operator == address(0) || sum == 0) continue; // forfeited (or nothing owed)
            _claimable[operator] += sum;
            emit PaymentCredited(operator, nb.node, batchId, sum);
        }
    }

    /// @dev EIP-712 struct hash of a stage's `Receipt`, hashed in scratch memory past the free
    ///      memory pointer (no allocation per receipt).
    function _receiptHash(bytes32 jobId, bytes32 modelId, StageReceipt calldata rc) private pure returns (bytes32 h) {
        bytes32 typeHash = RECEIPT_TYPEHASH;
        uint32 start = rc.start;
        uint32 end = rc.end;
        uint32 tokens = rc.tokens;
        bytes32 outputHash = rc.outputHash;
        uint256 amount = rc.amount;
        assembly ("memory-safe") {
            let p := mload(0x40)
            mstore(p, typeHash)
            mstore(add(p, 0x20), jobId)
            mstore(add(p, 0x40), modelId)
            mstore(add(p, 0x60), start)
            mstore(add(p, 0x80), end)
            mstore(add(p, 0xa0), tokens)
            mstore(add(p, 0xc0), outputHash)
            mstore(add(p, 0xe0), amount)
            h := keccak256(p, 0x100)
        }
    }

    /// @dev EIP-712 struct hash of the `Receipt` of a packed stage (see `MerkleStage`), hashed in
    ///      scratch memory past the free memory pointer (no allocation per leaf).
    function _receiptLeaf(bytes32 jobId, bytes32 modelId, uint256 w, bytes32 outputHash)
        private
        pure
        returns (bytes32 leaf)
    {
        bytes32 typeHash = RECEIPT_TYPEHASH;
        assembly ("memory-safe") {
            let p := mload(0x40)
            mstore(p, typeHash)
            mstore(add(p, 0x20), jobId)
            mstore(add(p, 0x40), modelId)
            mstore(add(p, 0x60), and(shr(192, w), 0xffffffff))
            mstore(add(p, 0x80), and(shr(160, w), 0xffffffff))
            mstore(add(p, 0xa0), and(shr(128, w), 0xffffffff))
            mstore(add(p, 0xc0), outputHash)
            mstore(add(p, 0xe0), and(w, 0xffffffffffffffffffffffffffffffff))
            leaf := keccak256(p, 0x100)
        }
    }

    /// @dev Merkle root of `leaves` in order, overwriting them: each level hashes pairs (2i, 2i+1)
    ///      with OpenZeppelin's commutative keccak256 (so `MerkleProof.verify` checks a leaf's
    ///      proof against the root) and carries an odd last element up unchanged; one leaf is its
    ///      own root, none is bytes32(0).
    function _merkleRoot(bytes32[] memory leaves) private pure returns (bytes32) {
        uint256 n = leaves.length;
        if (n == 0) return bytes32(0);
        while (n > 1) {
            uint256 half = n >> 1;
            for (uint256 i = 0; i < half; ++i) {
                leaves[i] = Hashes.commutativeKeccak256(leaves[2 * i], leaves[2 * i + 1]);
            }
            if (n & 1 == 1) {
                leaves[half] = leaves[n - 1];
                n = half + 1;
            } else {
                n = half;
            }
        }
        return leaves[0];
    }
}
