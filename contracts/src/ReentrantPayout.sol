// SPDX-License-Identifier: UNLICENSED
pragma solidity ^0.8.20;

import "./CrowdTasks.sol";

/// @notice TEST DOUBLE, never deployed by the coordinator. A payout address that
/// tries to re-enter CrowdTasks.withdraw() from its receive hook (or refuses
/// ether), so tests can show a payout is made exactly once.
contract ReentrantPayout {
    CrowdTasks public immutable target;
    bool public refuse;
    uint256 public receivedCalls;
    bool public reentered;

    constructor(CrowdTasks target_, bool refuse_) {
        target = target_;
        refuse = refuse_;
    }

    function pull() external {
        target.withdraw();
    }

    receive() external payable {
        require(!refuse, "refused");
        receivedCalls += 1;
        if (receivedCalls == 1) {
            try target.withdraw() {
                reentered = true;
            } catch {}
        }
    }
}
