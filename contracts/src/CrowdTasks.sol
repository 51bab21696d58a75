// SPDX-License-Identifier: UNLICENSED
pragma solidity ^0.8.20;

import "./Owned.sol";
import "./Registry.sol";
import "./MerkleSha256.sol";

/// @notice One contract for a task's whole life on chain: its reward pool, one
/// Merkle anchor per round, per-round reputation scores and pull-based rewards.
/// Kept together because crediting draws on the task's pool and every write
/// checks the same task/round bounds; the Registry stays separate because the
/// manufacturer owns identities independently of any task.
contract CrowdTasks is Owned {
    struct Task {
        uint256 pool; // wei still available for credit()
        bytes32 modelHash; // initial global model
        uint64 deadline; // unix seconds; after it the owner may reclaim the pool
        uint32 rounds;
        uint32 epsilonMilli; // LDP epsilon x 1000
        uint32 anchoredRounds; // rounds 1..anchoredRounds are anchored
        uint32 settledRounds; // rounds 1..settledRounds have a settlement root
        bool exists;
    }

    struct Settlement {
        bytes32 root; // Merkle root over (task, round, customer, reputation x 1000, reward) leaves
        uint256 total; // wei set aside from the pool for the round's claims
        uint256 claimed;
        uint32 customers;
    }

    struct Anchor {
        bytes32 merkleRoot;
        bytes32 modelHash;
        bytes32 manifestHash;
        uint32 accepted;
        uint32 rejected;
        uint64 blockNumber;
    }

    uint8 private constant DEVICE = 1; // Registry.DEVICE
    uint8 private constant EDGE = 2; // Registry.EDGE

    Registry public immutable registry;

    mapping(bytes32 => Task) private tasks;
    mapping(bytes32 => mapping(uint32 => Anchor)) private anchors;
    mapping(bytes32 => mapping(bytes32 => uint32)) private updateRounds;
    mapping(bytes32 => mapping(uint32 => bool)) private scored;
    mapping(bytes32 => mapping(uint32 => bool)) private credited;
    mapping(bytes32 => uint32) private scores;
    mapping(address => uint256) private owed;
    mapping(bytes32 => mapping(uint32 => Settlement)) private settlements;
    mapping(bytes32 => mapping(uint32 => mapping(bytes32 => bool))) private claimedBy;

    event TaskCreated(
        bytes32 indexed taskId, bytes32 modelHash, uint32 rounds, uint32 epsilonMilli, uint64 deadline, uint256 pool
    );
    event RoundAnchored(
        bytes32 indexed taskId,
        uint32 round,
        bytes32 merkleRoot,
        bytes32 globalModelHash,
        bytes32 manifestHash,
        uint32 accepted,
        uint32 rejected
    );
    event UpdateAnchored(
        bytes32 indexed taskId, uint32 round, bytes32 updateHash, bytes32 edgeKey, bytes32 customerKey
    );
    event ScoresSet(bytes32 indexed taskId, uint32 round, bytes32[] keys, uint32[] scoresMilli);
    event Credited(bytes32 indexed taskId, uint32 round, bytes32[] keys, uint256[] amounts, uint256 total);
    event Withdrawn(address indexed payout, uint256 amount);
    event PoolReclaimed(bytes32 indexed taskId, uint256 amount);
    event RoundSettled(bytes32 indexed taskId, uint32 round, bytes32 root, uint256 total, uint32 customers);
    event Claimed(bytes32 indexed taskId, uint32 round, bytes32 indexed customerKey, address payout, uint256 amount);

    constructor(Registry registry_) {
        require(address(registry_) != address(0), "zero registry");
        registry = registry_;
    }

    // ---------------------------------------------------------------- tasks

    function createTask(bytes32 taskId, bytes32 modelHash, uint32 rounds, uint32 epsilonMilli, uint64 deadline)
        external
        payable
        onlyOwner
    {
        require(taskId != bytes32(0), "zero task");
        require(!tasks[taskId].exists, "task exists");
        require(rounds > 0, "zero rounds");
        require(deadline > block.timestamp, "deadline passed");
        tasks[taskId] = Task({
            pool: msg.value,
            modelHash: modelHash,
            deadline: deadline,
            rounds: rounds,
            epsilonMilli: epsilonMilli,
            anchoredRounds: 0,
            settledRounds: 0,
            exists: true
        });
        emit TaskCreated(taskId, modelHash, rounds, epsilonMilli, deadline, msg.value);
    }

    function task(bytes32 taskId)
        external
        view
        returns (
            bool exists,
            bytes32 modelHash,
            uint32 rounds,
            uint32 epsilonMilli,
            uint64 deadline,
            uint256 pool,
            uint32 anchoredRounds
        )
    {
        Task storage t = tasks[taskId];
        return (t.exists, t.modelHash, t.rounds, t.epsilonMilli, t.deadline, t.pool, t.anchoredRounds);
    }

    /// @notice Returns the unspent pool once the task is over, so funds never stay locked. Only
    /// after every round is settled (or the deadline passed): a reclaim cannot take what a
    /// pending settlement owes; wei already set aside for claims stays claimable.
    function reclaim(bytes32 taskId) external onlyOwner {
        Task storage t = _task(taskId);
        require(t.settledRounds == t.rounds || block.timestamp > t.deadline, "task running");
        uint256 amount = t.pool;
        t.pool = 0;
        emit PoolReclaimed(taskId, amount);
        (bool ok,) = payable(msg.sender).call{value: amount}("");
        require(ok, "transfer failed");
    }

    // -------------------------------------------------------------- anchors

    /// @notice One transaction per round: the Merkle root commits to every accepted update.
    function anchorRound(
        bytes32 taskId,
        uint32 round,
        bytes32 merkleRoot,
        bytes32 globalModelHash,
        bytes32 manifestHash,
        uint32 accepted,
        uint32 rejected
    ) external onlyOwner {
        Task storage t = _task(taskId);
        require(round >= 1 && round <= t.rounds, "no such round");
        require(round > t.anchoredRounds, "already anchored");
        require(round == t.anchoredRounds + 1, "out of order");
        t.anchoredRounds = round;
        anchors[taskId][round] = Anchor({
            merkleRoot: merkleRoot,
            modelHash: globalModelHash,
            manifestHash: manifestHash,
            accepted: accepted,
            rejected: rejected,
            blockNumber: uint64(block.number)
        });
        emit RoundAnchored(taskId, round, merkleRoot, globalModelHash, manifestHash, accepted, rejected);
    }

    /// @notice Zeros (blockNumber 0) when the round is not anchored yet.
    function roundAnchor(bytes32 taskId, uint32 round)
        external
        view
        returns (
            bytes32 merkleRoot,
            bytes32 globalModelHash,
            bytes32 manifestHash,
            uint32 accepted,
            uint32 rejected,
            uint64 blockNumber
        )
    {
        Anchor storage a = anchors[taskId][round];
        return (a.merkleRoot, a.modelHash, a.manifestHash, a.accepted, a.rejected, a.blockNumber);
    }

    function verifyInclusion(bytes32 taskId, uint32 round, bytes32 leaf, bytes32[] calldata proof)
        external
        view
        returns (bool)
    {
        Anchor storage a = anchors[taskId][round];
        if (a.blockNumber == 0) {
            return false;
        }
        return MerkleSha256.verify(leaf, proof, a.merkleRoot);
    }

    /// @notice Baseline for the gas benchmark: one transaction per update instead of
    /// one per round. Both identities must still be enrolled.
    function anchorUpdate(bytes32 taskId, uint32 round, bytes32 updateHash, bytes32 edgeKey, bytes32 customerKey)
        external
        onlyOwner
    {
        Task storage t = _task(taskId);
        require(round >= 1 && round <= t.rounds, "no such round");
        require(round > t.anchoredRounds, "round closed");
        require(updateHash != bytes32(0), "zero update");
        require(updateRounds[taskId][updateHash] == 0, "update exists");
        require(registry.isActive(edgeKey, EDGE), "inactive edge");
        require(registry.isActive(customerKey, DEVICE), "inactive device");
        updateRounds[taskId][updateHash] = round;
        emit UpdateAnchored(taskId, round, updateHash, edgeKey, customerKey);
    }

    /// @notice Round in which an update was anchored by anchorUpdate, 0 if never.
    function updateRound(bytes32 taskId, bytes32 updateHash) external view returns (uint32) {
        return updateRounds[taskId][updateHash];
    }

    // ----------------------------------------------------------- settlement

    /// @notice A round's whole settlement in one constant-size transaction: the root over its
    /// (customer, reputation, reward) leaves and the total it pays. Settled after the round is
    /// anchored and in order; customers then claim with a proof (claim), each leaf once.
    function settleRound(bytes32 taskId, uint32 round, bytes32 root, uint256 total, uint32 customers)
        external
        onlyOwner
    {
        Task storage t = _task(taskId);
        require(round >= 1 && round <= t.rounds, "no such round");
        require(round <= t.anchoredRounds, "round not anchored");
        require(round == t.settledRounds + 1, "out of order");
        require(total <= t.pool, "exceeds pool");
        t.settledRounds = round;
        t.pool -= total;
        settlements[taskId][round] = Settlement({root: root, total: total, claimed: 0, customers: customers});
        emit RoundSettled(taskId, round, root, total, customers);
    }

    function settlement(bytes32 taskId, uint32 round)
        external
        view
        returns (bytes32 root, uint256 total, uint256 claimed, uint32 customers)
    {
        Settlement storage st = settlements[taskId][round];
        return (st.root, st.total, st.claimed, st.customers);
    }

    /// @notice The leaf a customer proves: binds task, round, key, reputation and amount.
    function settlementLeaf(bytes32 taskId, uint32 round, bytes32 customerKey, uint32 reputationMilli, uint256 amount)
        public
        pure
        returns (bytes32)
    {
        return sha256(abi.encodePacked(taskId, round, customerKey, reputationMilli, amount));
    }

    function isClaimed(bytes32 taskId, uint32 round, bytes32 customerKey) external view returns (bool) {
        return claimedBy[taskId][round][customerKey];
    }

    /// @notice Anyone may claim for a customer; the wei goes to the customer's registered payout.
    /// Checks-effects-interactions: marked claimed before the transfer, so never paid twice.
    function claim(
        bytes32 taskId,
        uint32 round,
        bytes32 customerKey,
        uint32 reputationMilli,
        uint256 amount,
        bytes32[] calldata proof
    ) external {
        Settlement storage st = settlements[taskId][round];
        require(st.root != bytes32(0), "round not settled");
        require(!claimedBy[taskId][round][customerKey], "already claimed");
        require(
            MerkleSha256.verify(settlementLeaf(taskId, round, customerKey, reputationMilli, amount), proof, st.root),
            "bad proof"
        );
        require(st.claimed + amount <= st.total, "exceeds settlement");
        address payout = registry.payoutOf(customerKey);
        require(payout != address(0), "no payout");
        claimedBy[taskId][round][customerKey] = true;
        st.claimed += amount;
        scores[customerKey] = reputationMilli;
        emit Claimed(taskId, round, customerKey, payout, amount);
        if (amount > 0) {
            (bool ok,) = payable(payout).call{value: amount}("");
            require(ok, "transfer failed");
        }
    }

    // ----------------------------------------------------------- reputation

    /// @notice All of a round's scores in one transaction; a round is scored once.
    function setScores(bytes32 taskId, uint32 round, bytes32[] calldata keys, uint32[] calldata scoresMilli)
        external
        onlyOwner
    {
        Task storage t = _task(taskId);
        require(round >= 1 && round <= t.rounds, "no such round");
        require(keys.length == scoresMilli.length, "length mismatch");
        require(!scored[taskId][round], "already scored");
        scored[taskId][round] = true;
        for (uint256 i = 0; i < keys.length; ++i) {
            require(registry.roleOf(keys[i]) != 0, "inactive key");
            scores[keys[i]] = scoresMilli[i];
        }
        emit ScoresSet(taskId, round, keys, scoresMilli);
    }

    /// @notice Latest score written for a key (x 1000); 0 if never scored.
    function reputationOf(bytes32 key) external view returns (uint32) {
        return scores[key];
    }

    // -------------------------------------------------------------- rewards

    /// @notice Moves wei from the task's pool to the payout addresses' balances;
    /// nothing is sent here (pull pattern), so one bad receiver cannot block a round.
    function credit(bytes32 taskId, uint32 round, bytes32[] calldata keys, uint256[] calldata amounts)
        external
        onlyOwner
    {
        Task storage t = _task(taskId);
        require(round >= 1 && round <= t.rounds, "no such round");
        require(keys.length == amounts.length, "length mismatch");
        require(!credited[taskId][round], "already credited");
        credited[taskId][round] = true;
        uint256 total = 0;
        for (uint256 i = 0; i < keys.length; ++i) {
            require(registry.roleOf(keys[i]) != 0, "inactive key");
            address payout = registry.payoutOf(keys[i]);
            require(payout != address(0), "no payout");
            owed[payout] += amounts[i];
            total += amounts[i];
        }
        require(total <= t.pool, "exceeds pool");
        t.pool -= total;
        emit Credited(taskId, round, keys, amounts, total);
    }

    function owedTo(address payout) external view returns (uint256) {
        return owed[payout];
    }

    /// @notice Checks-effects-interactions: the balance is zeroed before the call,
    /// so a re-entering receiver finds nothing left.
    function withdraw() external {
        uint256 amount = owed[msg.sender];
        require(amount > 0, "nothing owed");
        owed[msg.sender] = 0;
        emit Withdrawn(msg.sender, amount);
        (bool ok,) = payable(msg.sender).call{value: amount}("");
        require(ok, "transfer failed");
    }

    function _task(bytes32 taskId) private view returns (Task storage t) {
        t = tasks[taskId];
        require(t.exists, "no such task");
    }
}
