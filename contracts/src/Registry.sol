// SPDX-License-Identifier: UNLICENSED
pragma solidity ^0.8.20;

import "./Owned.sol";

/// @notice Permissioned identity registry: the manufacturer enrols the Ed25519
/// public keys of its devices and MEC edge servers, and can revoke them. Other
/// contracts ask it whether a key may still take part.
contract Registry is Owned {
    uint8 public constant DEVICE = 1;
    uint8 public constant EDGE = 2;

    struct Entry {
        uint8 role;
        bool active;
        address payout;
    }

    mapping(bytes32 => Entry) private entries;
    mapping(bytes32 => bytes32) private edges; // device key -> the edge server key it sends to

    event Registered(bytes32 indexed key, uint8 role, address payout);
    event Removed(bytes32 indexed key);
    event EdgeBound(bytes32 indexed device, bytes32 edge);

    function register(bytes32 key, uint8 role, address payout) external onlyOwner {
        _register(key, role, payout);
    }

    /// @notice One transaction for a whole batch, because enrolment happens per fleet.
    function registerMany(bytes32[] calldata keys, uint8[] calldata roles, address[] calldata payouts)
        external
        onlyOwner
    {
        require(keys.length == roles.length && keys.length == payouts.length, "length mismatch");
        for (uint256 i = 0; i < keys.length; ++i) {
            _register(keys[i], roles[i], payouts[i]);
        }
    }

    /// @notice Binds devices to their edge servers, so an update for a device can only come,
    /// with the device's own signed receipt, through the edge the manufacturer assigned it.
    function bindEdges(bytes32[] calldata devices, bytes32[] calldata edgeKeys) external onlyOwner {
        require(devices.length == edgeKeys.length, "length mismatch");
        for (uint256 i = 0; i < devices.length; ++i) {
            Entry storage d = entries[devices[i]];
            Entry storage e = entries[edgeKeys[i]];
            require(d.active && d.role == DEVICE, "not an active device");
            require(e.active && e.role == EDGE, "not an active edge");
            edges[devices[i]] = edgeKeys[i];
            emit EdgeBound(devices[i], edgeKeys[i]);
        }
    }

    /// @notice The edge an active device is bound to; zero when unbound, removed or not a device.
    function edgeOf(bytes32 device) external view returns (bytes32) {
        Entry storage d = entries[device];
        return d.active && d.role == DEVICE ? edges[device] : bytes32(0);
    }

    function remove(bytes32 key) external onlyOwner {
        require(entries[key].active, "not registered");
        entries[key].active = false;
        emit Removed(key);
    }

    function isActive(bytes32 key, uint8 role) external view returns (bool) {
        Entry storage e = entries[key];
        return e.active && e.role == role;
    }

    /// @notice Role of an active key, 0 when the key is unknown or removed.
    function roleOf(bytes32 key) external view returns (uint8) {
        Entry storage e = entries[key];
        return e.active ? e.role : 0;
    }

    function payoutOf(bytes32 key) external view returns (address) {
        return entries[key].payout;
    }

    function _register(bytes32 key, uint8 role, address payout) private {
        require(key != bytes32(0), "zero key");
        require(role == DEVICE || role == EDGE, "bad role");
        require(!entries[key].active, "already registered");
        entries[key] = Entry({role: role, active: true, payout: payout});
        emit Registered(key, role, payout);
    }
}
