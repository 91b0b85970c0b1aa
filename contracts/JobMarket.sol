// SPDX-License-Identifier: Apache-2.0
pragma solidity ^0.8.24;

import {IERC20} from "@openzeppelin/contracts/token/ERC20/IERC20.sol";
import {IERC20Permit} from "@openzeppelin/contracts/token/ERC20/extensions/IERC20Permit.sol";
import {SafeERC20} from "@openzeppelin/contracts/token/ERC20/utils/SafeERC20.sol";
import {AccessControl} from "@openzeppelin/contracts/access/AccessControl.sol";
import {ReentrancyGuard} from "@openzeppelin/contracts/utils/ReentrancyGuard.sol";
import {EIP712} from "@openzeppelin/contracts/utils/cryptography/EIP712.sol";
import {ECDSA} from "@openzeppelin/contracts/utils/cryptography/ECDSA.sol";
import {INodeRegistry} from "./interfaces/INodeRegistry.sol";

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
contract JobMarket is AccessControl, ReentrancyGuard, EIP712 {
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
    uint16 private _feeBps;

    mapping(address client => mapping(address broker => uint256)) private _escrow;
    mapping(address client => mapping(address broker => PendingWithdrawal)) private _withdrawals;
    mapping(address client => mapping(uint256 word => uint256 bits)) private _nonceBitmap;
    mapping(address account => uint256) private _claimable;
    mapping(address client => mapping(address spender => Spender)) private _spenders;
    mapping(address broker => mapping(bytes32 batchId => bool)) private _batchSettled;
    uint256 private _totalEscrow;
    uint256 private _totalClaimable;

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
    error JobMarketIncompleteCoverage(uint256 jobIndex, uint32 coveredTo, uint32 numLayers);
    error JobMarketNodeNotRoutable(uint256 jobIndex, uint256 receiptIndex, address node);
    error JobMarketCostExceedsAuthorization(uint256 jobIndex, uint256 total, uint256 maxCost);
    error JobMarketInsufficientEscrow(
        uint256 jobIndex, address client, address broker, uint256 needed, uint256 available
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
        _feeBps = feeBps_;
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
        _totalEscrow -= amount;
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

        uint16 feeBps = _feeBps;
        uint256 paid = 0;
        uint256 fees = 0;
        for (uint256 i = 0; i < jobs.length; ++i) {
            (uint256 cost, uint256 fee) = _settleJob(i, jobs[i], feeBps, payees);
            paid += cost;
            fees += fee;
        }
        for (uint256 k = 0; k < payees.count; ++k) {
            address operator = payees.operators[k];
            if (operator == address(0)) continue; // forfeited: nothing owed
            _claimable[operator] += payees.owed[k];
            emit PaymentCredited(operator, payees.nodes[k], batchId, payees.owed[k]);
        }
        if (fees > 0) _claimable[_treasury] += fees;
        _totalEscrow -= paid + fees;
        _totalClaimable += paid + fees;
        emit BatchSettled(batchId, msg.sender, jobs.length, paid, fees);
    }

    /// @notice Pay out everything credited to the caller (node earnings, protocol fees).
    function claim() external nonReentrant {
        uint256 amount = _claimable[msg.sender];
        if (amount == 0) revert JobMarketNothingToClaim(msg.sender);
        _claimable[msg.sender] = 0;
        _totalClaimable -= amount;
        emit Claimed(msg.sender, amount);
        _token.safeTransfer(msg.sender, amount);
    }

    /// @notice Change the protocol fee and treasury.
    function setFee(uint16 feeBps_, address treasury_) external onlyRole(DEFAULT_ADMIN_ROLE) {
        if (feeBps_ > _MAX_FEE_BPS) revert JobMarketInvalidFee(feeBps_, _MAX_FEE_BPS);
        if (treasury_ == address(0)) revert JobMarketZeroAddress();
        _feeBps = feeBps_;
        _treasury = treasury_;
        emit FeeChanged(feeBps_, treasury_);
    }

    // ----------------------------------------------------------------------------- views

    /// @notice Job id of a client's authorization nonce: keccak256(abi.encode(client, nonce)).
    function jobIdOf(address client, uint256 nonce) public pure returns (bytes32) {
        return keccak256(abi.encode(client, nonce));
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

    /// @notice Earnings credited to `account` and not yet claimed.
    function claimableOf(address account) external view returns (uint256) {
        return _claimable[account];
    }

    /// @notice Sum of all escrow balances.
    function totalEscrow() external view returns (uint256) {
        return _totalEscrow;
    }

    /// @notice Sum of all credited, unclaimed earnings.
    function totalClaimable() external view returns (uint256) {
        return _totalClaimable;
    }

    /// @notice Protocol fee in basis points, charged to the client on top of the receipts.
    function feeBps() external view returns (uint16) {
        return _feeBps;
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
        _totalEscrow += amount;
        emit Deposited(client, broker, msg.sender, amount, escrow);
        _token.safeTransferFrom(client, address(this), amount);
    }

    function _settleJob(uint256 index, JobSettlement calldata job, uint16 feeBps, Payees memory payees)
        private
        returns (uint256 cost, uint256 fee)
    {
        (bytes32 jobId, address signer) = _consumeAuthorization(index, job);
        cost = _checkReceipts(index, job, jobId, payees);
        fee = (cost * feeBps) / _BPS;
        if (signer != job.client) _spend(index, job.client, signer, cost + fee);
        _charge(index, job, cost + fee);
        emit JobSettled(jobId, job.client, cost, fee);
    }

    /// @dev Checks deadline and signature (the client's, or a spender's with a standing
    ///      authorization), marks the nonce used, returns the job id and the signer. A deadline
    ///      more than `maxAuthorizationLifetime` ahead is refused, so an authorization settles
    ///      within that lifetime of its deadline, before a withdrawal requested after the broker
    ///      admitted it can be ready (see the contract notes).
    function _consumeAuthorization(uint256 index, JobSettlement calldata job) private returns (bytes32, address) {
        if (block.timestamp > job.deadline) revert JobMarketAuthorizationExpired(index, job.deadline, block.timestamp);
        uint256 maxDeadline = block.timestamp + _maxAuthorizationLifetime;
        if (job.deadline > maxDeadline) revert JobMarketAuthorizationTooLong(index, job.deadline, maxDeadline);
        bytes32 authHash = _hashTypedDataV4(
            keccak256(
                abi.encode(
                    JOB_AUTHORIZATION_TYPEHASH, job.client, msg.sender, job.modelId, job.maxCost, job.nonce, job.deadline
                )
            )
        );
        address signer = ECDSA.recover(authHash, job.r, job.vs);
        if (signer != job.client && _spenders[job.client][signer].expiry == 0) {
            revert JobMarketInvalidClientSignature(index, job.client, signer);
        }
        mapping(uint256 => uint256) storage bitmap = _nonceBitmap[job.client];
        uint256 bit = 1 << (job.nonce & 0xff);
        uint256 word = bitmap[job.nonce >> 8];
        if (word & bit != 0) revert JobMarketJobAlreadySettled(index, job.client, job.nonce);
        bitmap[job.nonce >> 8] = word | bit;
        return (jobIdOf(job.client, job.nonce), signer);
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
    function _charge(uint256 index, JobSettlement calldata job, uint256 total) private {
        if (total > job.maxCost) revert JobMarketCostExceedsAuthorization(index, total, job.maxCost);
        mapping(address => uint256) storage part = _escrow[job.client];
        uint256 escrow = part[msg.sender];
        if (escrow < total) revert JobMarketInsufficientEscrow(index, job.client, msg.sender, total, escrow);
        part[msg.sender] = escrow - total;
    }

    /// @dev Checks ranges, coverage and signatures; returns what the client pays for receipts
    ///      (forfeited receipts excluded).
    function _checkReceipts(uint256 index, JobSettlement calldata job, bytes32 jobId, Payees memory payees)
        private
        returns (uint256 cost)
    {
        uint256 n = job.receipts.length;
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
        uint32 coveredTo = 0;
        for (uint256 j = 0; j < n; ++j) {
            StageReceipt calldata rc = job.receipts[j];
            if (rc.start != coveredTo || rc.end <= rc.start || rc.end > numLayers) {
                revert JobMarketInvalidRange(index, j, rc.start, rc.end, coveredTo);
            }
            coveredTo = rc.end;
            bytes32 digest = _hashTypedDataV4(
                keccak256(
                    abi.encode(RECEIPT_TYPEHASH, jobId, job.modelId, rc.start, rc.end, rc.tokens, rc.outputHash, rc.amount)
                )
            );
            address node = ECDSA.recover(digest, rc.r, rc.vs);
            if (_credit(payees, node, rc.amount, index, j)) {
                cost += rc.amount;
            } else {
                emit ReceiptForfeited(jobId, node, rc.amount);
            }
        }
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
}
