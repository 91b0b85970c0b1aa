// SPDX-License-Identifier: Apache-2.0
pragma solidity ^0.8.24;

import {IERC20} from "@openzeppelin/contracts/token/ERC20/IERC20.sol";
import {IERC20Permit} from "@openzeppelin/contracts/token/ERC20/extensions/IERC20Permit.sol";
import {SafeERC20} from "@openzeppelin/contracts/token/ERC20/utils/SafeERC20.sol";
import {AccessControl} from "@openzeppelin/contracts/access/AccessControl.sol";
import {ReentrancyGuard} from "@openzeppelin/contracts/utils/ReentrancyGuard.sol";
import {SafeCast} from "@openzeppelin/contracts/utils/math/SafeCast.sol";
import {IStakingManager} from "./interfaces/IStakingManager.sol";

/// @title StakingManager
/// @notice Node operators lock DLIS as a bond. Stake leaves through an unbonding period and stays
///         slashable until it is withdrawn.
/// @dev Slashed tokens are split: `reporterShareBps` of the slashed amount is credited to the
///      reporter that brought the evidence, the rest to the treasury. Both are pull payments
///      (`claim`). Each evidence hash can be used once. A slash takes active stake first, then
///      unbonding stake, and never more than the operator's total stake.
contract StakingManager is IStakingManager, AccessControl, ReentrancyGuard {
    using SafeERC20 for IERC20;

    /// @notice Role allowed to slash (the oracle).
    bytes32 public constant SLASHER_ROLE = keccak256("SLASHER_ROLE");
    uint16 private constant _BPS = 10_000;

    struct Unbonding {
        uint128 amount;
        uint64 releaseTime;
    }

    IERC20 private immutable _token;
    address private _treasury;
    uint256 private _minStake;
    uint64 private immutable _unbondingPeriod;
    uint16 private _reporterShareBps;

    mapping(address operator => uint256) private _active;
    mapping(address operator => Unbonding) private _unbonding;
    mapping(address account => uint256) private _claimable;
    mapping(bytes32 evidenceHash => bool) private _evidenceUsed;
    uint256 private _totalStaked;

    /// @notice An operator added stake.
    event Staked(address indexed operator, uint256 amount, uint256 activeStake);
    /// @notice An operator moved stake into unbonding; it can be withdrawn at `releaseTime`.
    event UnstakeRequested(address indexed operator, uint256 amount, uint256 unbondingTotal, uint64 releaseTime);
    /// @notice Unbonded stake was paid out to the operator.
    event Withdrawn(address indexed operator, uint256 amount);
    /// @notice Stake was slashed for evidence `evidenceHash`.
    event Slashed(
        address indexed operator,
        bytes32 indexed evidenceHash,
        address indexed reporter,
        uint256 amount,
        uint256 reporterShare,
        uint256 treasuryShare
    );
    /// @notice Slashing proceeds were claimed.
    event Claimed(address indexed account, uint256 amount);
    /// @notice The minimum stake changed.
    event MinStakeChanged(uint256 previous, uint256 current);
    /// @notice The reporter share or treasury changed.
    event SlashSplitChanged(uint16 reporterShareBps, address treasury);

    error StakingManagerZeroAmount();
    error StakingManagerZeroAddress();
    error StakingManagerInsufficientStake(uint256 requested, uint256 available);
    error StakingManagerNothingUnbonding(address operator);
    error StakingManagerStillUnbonding(uint64 releaseTime, uint64 now_);
    error StakingManagerEvidenceAlreadyUsed(bytes32 evidenceHash);
    error StakingManagerNothingToSlash(address operator);
    error StakingManagerNothingToClaim(address account);
    error StakingManagerInvalidBps(uint16 bps);
    error StakingManagerTooManyOperators(uint256 count, uint256 max);

    /// @param token_ the staking token
    /// @param admin receives DEFAULT_ADMIN_ROLE
    /// @param treasury_ receives the treasury share of slashes
    /// @param minStake_ minimum active stake for an operator to be routable
    /// @param unbondingPeriod_ seconds between `requestUnstake` and `withdraw`
    /// @param reporterShareBps_ share of a slash credited to the reporter, in basis points
    constructor(
        IERC20 token_,
        address admin,
        address treasury_,
        uint256 minStake_,
        uint64 unbondingPeriod_,
        uint16 reporterShareBps_
    ) {
        if (address(token_) == address(0) || admin == address(0) || treasury_ == address(0)) {
            revert StakingManagerZeroAddress();
        }
        if (reporterShareBps_ > _BPS) revert StakingManagerInvalidBps(reporterShareBps_);
        _token = token_;
        _treasury = treasury_;
        _minStake = minStake_;
        _unbondingPeriod = unbondingPeriod_;
        _reporterShareBps = reporterShareBps_;
        _grantRole(DEFAULT_ADMIN_ROLE, admin);
    }

    // ----------------------------------------------------------------------------- operators

    /// @notice Lock `amount` tokens as stake (the caller must have approved this contract).
    function stake(uint256 amount) external nonReentrant {
        _stake(msg.sender, amount);
    }

    /// @notice Lock `amount` tokens as stake using an EIP-2612 permit instead of an approval.
    /// @dev If the permit was already used (front-run), staking proceeds when the allowance suffices.
    function stakeWithPermit(uint256 amount, uint256 deadline, uint8 v, bytes32 r, bytes32 s) external nonReentrant {
        try IERC20Permit(address(_token)).permit(msg.sender, address(this), amount, deadline, v, r, s) {} catch {}
        _stake(msg.sender, amount);
    }

    /// @notice Move `amount` of active stake into unbonding. The unbonding clock restarts for the
    ///         whole unbonding balance.
    function requestUnstake(uint256 amount) external {
        if (amount == 0) revert StakingManagerZeroAmount();
        uint256 active = _active[msg.sender];
        if (amount > active) revert StakingManagerInsufficientStake(amount, active);
        _active[msg.sender] = active - amount;
        Unbonding storage u = _unbonding[msg.sender];
        u.amount += SafeCast.toUint128(amount);
        u.releaseTime = uint64(block.timestamp) + _unbondingPeriod;
        emit UnstakeRequested(msg.sender, amount, u.amount, u.releaseTime);
    }

    /// @notice Withdraw all unbonded stake once its release time has passed.
    function withdraw() external nonReentrant {
        Unbonding memory u = _unbonding[msg.sender];
        if (u.amount == 0) revert StakingManagerNothingUnbonding(msg.sender);
        if (block.timestamp < u.releaseTime) {
            revert StakingManagerStillUnbonding(u.releaseTime, uint64(block.timestamp));
        }
        delete _unbonding[msg.sender];
        _totalStaked -= u.amount;
        emit Withdrawn(msg.sender, u.amount);
        _token.safeTransfer(msg.sender, u.amount);
    }

    // ----------------------------------------------------------------------------- slashing

    /// @notice Slash up to `amount` of `operator`'s stake (active first, then unbonding) for the
    ///         evidence identified by `evidenceHash`. Proceeds are split between `reporter` and
    ///         the treasury and credited for `claim`.
    /// @return slashed the amount actually taken (at most the operator's total stake)
    function slash(address operator, uint256 amount, bytes32 evidenceHash, address reporter)
        external
        onlyRole(SLASHER_ROLE)
        returns (uint256 slashed)
    {
        if (amount == 0) revert StakingManagerZeroAmount();
        if (reporter == address(0)) revert StakingManagerZeroAddress();
        if (_evidenceUsed[evidenceHash]) revert StakingManagerEvidenceAlreadyUsed(evidenceHash);
        uint256 active = _active[operator];
        Unbonding storage u = _unbonding[operator];
        uint256 total = active + u.amount;
        if (total == 0) revert StakingManagerNothingToSlash(operator);

        slashed = amount < total ? amount : total;
        uint256 fromActive = slashed < active ? slashed : active;
        _active[operator] = active - fromActive;
        u.amount -= uint128(slashed - fromActive);
        _totalStaked -= slashed;
        _evidenceUsed[evidenceHash] = true;

        uint256 reporterShare = (slashed * _reporterShareBps) / _BPS;
        uint256 treasuryShare = slashed - reporterShare;
        _claimable[reporter] += reporterShare;
        _claimable[_treasury] += treasuryShare;
        emit Slashed(operator, evidenceHash, reporter, slashed, reporterShare, treasuryShare);
    }

    /// @notice Pay out the caller's slashing proceeds (reporter rewards, treasury share).
    function claim() external nonReentrant {
        uint256 amount = _claimable[msg.sender];
        if (amount == 0) revert StakingManagerNothingToClaim(msg.sender);
        _claimable[msg.sender] = 0;
        emit Claimed(msg.sender, amount);
        _token.safeTransfer(msg.sender, amount);
    }

    // ----------------------------------------------------------------------------- admin

    /// @notice Change the minimum active stake for routing.
    function setMinStake(uint256 minStake_) external onlyRole(DEFAULT_ADMIN_ROLE) {
        emit MinStakeChanged(_minStake, minStake_);
        _minStake = minStake_;
    }

    /// @notice Change the reporter share of slashes and the treasury address.
    function setSlashSplit(uint16 reporterShareBps_, address treasury_) external onlyRole(DEFAULT_ADMIN_ROLE) {
        if (reporterShareBps_ > _BPS) revert StakingManagerInvalidBps(reporterShareBps_);
        if (treasury_ == address(0)) revert StakingManagerZeroAddress();
        _reporterShareBps = reporterShareBps_;
        _treasury = treasury_;
        emit SlashSplitChanged(reporterShareBps_, treasury_);
    }

    // ----------------------------------------------------------------------------- views

    /// @inheritdoc IStakingManager
    function activeStake(address operator) external view returns (uint256) {
        return _active[operator];
    }

    /// @inheritdoc IStakingManager
    function isActive(address operator) external view returns (bool) {
        return _minStake > 0 ? _active[operator] >= _minStake : _active[operator] > 0;
    }

    /// @inheritdoc IStakingManager
    function areActive(address[] calldata operators) external view returns (uint256 mask) {
        uint256 n = operators.length;
        if (n > 256) revert StakingManagerTooManyOperators(n, 256);
        uint256 minStake = _minStake;
        for (uint256 i = 0; i < n; ++i) {
            uint256 stake = _active[operators[i]];
            if (minStake > 0 ? stake >= minStake : stake > 0) mask |= 1 << i;
        }
    }

    /// @notice Stake in unbonding and the time it can be withdrawn.
    function unbondingOf(address operator) external view returns (uint256 amount, uint64 releaseTime) {
        Unbonding memory u = _unbonding[operator];
        return (u.amount, u.releaseTime);
    }

    /// @notice Active plus unbonding stake: everything that can still be slashed.
    function totalStakeOf(address operator) external view returns (uint256) {
        return _active[operator] + _unbonding[operator].amount;
    }

    /// @notice Slashing proceeds claimable by `account`.
    function claimableOf(address account) external view returns (uint256) {
        return _claimable[account];
    }

    /// @notice Whether an evidence hash has already been used for a slash.
    function evidenceUsed(bytes32 evidenceHash) external view returns (bool) {
        return _evidenceUsed[evidenceHash];
    }

    /// @notice Sum of all active and unbonding stake held by the contract.
    function totalStaked() external view returns (uint256) {
        return _totalStaked;
    }

    /// @notice The staking token.
    function token() external view returns (IERC20) {
        return _token;
    }

    /// @notice Minimum active stake for routing.
    function minStake() external view returns (uint256) {
        return _minStake;
    }

    /// @notice Seconds between an unstake request and the earliest withdrawal.
    function unbondingPeriod() external view returns (uint64) {
        return _unbondingPeriod;
    }

    /// @notice Share of each slash credited to the reporter, in basis points.
    function reporterShareBps() external view returns (uint16) {
        return _reporterShareBps;
    }

    /// @notice Receiver of the treasury share of slashes.
    function treasury() external view returns (address) {
        return _treasury;
    }

    function _stake(address operator, uint256 amount) private {
        if (amount == 0) revert StakingManagerZeroAmount();
        uint256 active = _active[operator] + amount;
        _active[operator] = active;
        _totalStaked += amount;
        emit Staked(operator, amount, active);
        _token.safeTransferFrom(operator, address(this), amount);
    }
}
