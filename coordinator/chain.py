"""Chain access for the coordinator: one small client over an in-process or a real chain.

Both back ends share one code path: every transaction is signed locally with the
coordinator's key and sent with ``eth_sendRawTransaction``, nonces are counted here,
and a write returns only after its receipt is ``confirmations`` blocks deep. Only the
provider differs: ``embedded`` runs eth-tester (py-evm) in this process and funds a
fresh local key from a tester account; ``rpc`` talks HTTP to a node (e.g. the
EthereumJS Clique PoA client).

Every failure leaves this module as one ``ChainError`` carrying a reason; a revert
carries the contract's revert string where the back end reports it.

EthereumJS 0.9.0 quirks handled here (see shared/dependency-notes.md):
* ``eth_gasPrice`` crashes after a few blocks, so set ``gas_price_wei`` for it.
* "pending" is not a block tag it knows, so nonces start from "latest".
* A reverting ``eth_call`` returns the Error(string) data as its result and
  ``eth_estimateGas`` does not fail, so the dry run before each send decodes the result.
* Its receipts have no ``status``. A receipt without one is judged failed when the
  transaction used all its gas (out of gas / invalid opcode; a plain ether transfer,
  which always uses exactly 21,000, excepted) or, for calls that must emit an event
  (all state changes of crowdfl's contracts do), when it has no logs. A failed
  transaction is then replayed with ``eth_call`` on the state before its block to
  recover the revert reason (best effort: earlier transactions of the same block are
  not replayed).
* Right after indexing a transaction it may answer the receipt query with "value ...
  not found in DB"; receipt polling treats node errors as "not yet" until the timeout.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Literal, cast

from eth_account import Account
from eth_account.signers.local import LocalAccount
from eth_utils.exceptions import ValidationError as _EthValidationError
from hexbytes import HexBytes
from web3 import EthereumTesterProvider, HTTPProvider, Web3
from web3.contract import Contract
from web3.contract.contract import ContractEvent, ContractFunction
from web3.exceptions import ContractLogicError, TransactionNotFound, Web3Exception
from web3.middleware import ExtraDataToPOAMiddleware
from web3.types import BlockIdentifier, EventData, TxParams, TxReceipt

log = logging.getLogger(__name__)

try:  # eth-tester is a test/embedded-only dependency
    from eth_tester.exceptions import TransactionFailed as _TesterTransactionFailed
    from eth_tester.exceptions import ValidationError as _TesterValidationError
except ImportError:  # pragma: no cover - only without web3[tester]

    class _TesterTransactionFailed(Exception):  # type: ignore[no-redef]
        """Placeholder so the except clauses below stay valid."""

    class _TesterValidationError(Exception):  # type: ignore[no-redef]
        """Placeholder so the except clauses below stay valid."""


ChainKind = Literal["embedded", "rpc"]

# What the embedded chain gives the fresh coordinator key: plenty for reward pools in tests.
EMBEDDED_FUNDING_WEI = 10**23  # the tester accounts hold 10**24 each
_GAS_MARGIN_NUM, _GAS_MARGIN_DEN, _GAS_MARGIN_ADD = 6, 5, 10_000
_TRANSFER_GAS = 21_000
_REVERT_PREFIXES = ("execution reverted: ", "execution reverted:", "VM Exception while processing transaction: revert ")

_CAUGHT: tuple[type[BaseException], ...] = (
    _TesterTransactionFailed,
    ContractLogicError,
    Web3Exception,
    _TesterValidationError,  # e.g. "Sender does not have enough balance" on the embedded chain
    _EthValidationError,
    ValueError,
    OSError,  # requests' connection errors derive from it
)


class ChainError(Exception):
    """The one error type of the chain boundary; ``reverted`` tells a contract refusal apart."""

    def __init__(self, reason: str, *, reverted: bool = False) -> None:
        super().__init__(reason)
        self.reason = reason
        self.reverted = reverted


@dataclass(frozen=True)
class ChainConfig:
    """How to reach the chain; built from the coordinator's config file."""

    kind: ChainKind = "embedded"
    rpc_url: str | None = None
    private_key: str | None = field(default=None, repr=False)  # hex; embedded: None = a fresh key
    chain_id: int | None = None  # None = trust the node; else refuse any other chain
    confirmations: int = 0  # extra blocks on top of the receipt's (reorg-safe depth)
    gas_price_wei: int | None = None  # None = ask the node (never for EthereumJS 0.9.0)
    poa: bool = False  # Clique extraData (97 bytes) needs the PoA middleware
    receipt_timeout_s: float = 120.0
    poll_interval_s: float = 0.2

    def __post_init__(self) -> None:
        if self.kind not in ("embedded", "rpc"):
            raise ValueError(f"kind must be 'embedded' or 'rpc', got {self.kind!r}")
        if self.kind == "rpc" and not self.rpc_url:
            raise ValueError("kind='rpc' needs rpc_url")
        if self.kind == "rpc" and not self.private_key:
            raise ValueError("kind='rpc' needs private_key (transactions are signed locally)")
        if self.confirmations < 0:
            raise ValueError("confirmations must be >= 0")
        if self.gas_price_wei is not None and self.gas_price_wei <= 0:
            raise ValueError("gas_price_wei must be > 0")
        if self.receipt_timeout_s <= 0 or self.poll_interval_s <= 0:
            raise ValueError("timeouts must be > 0")


@dataclass(frozen=True)
class Receipt:
    """What callers keep of a mined transaction."""

    tx_hash: bytes
    block_number: int
    gas_used: int


@dataclass
class _Nonces:
    """Next nonce per sender, counted locally so back-to-back sends never collide."""

    lock: threading.Lock = field(default_factory=threading.Lock)
    next: dict[str, int] = field(default_factory=dict)


class ChainClient:
    """Signs, sends and confirms transactions; reads calls and logs. Build it with ``connect``."""

    def __init__(
        self,
        w3: Web3,
        account: LocalAccount,
        cfg: ChainConfig,
        chain_id: int,
        advance: Callable[[], None],
    ) -> None:
        self.w3 = w3
        self.account = account
        self.cfg = cfg
        self.chain_id = chain_id
        self._advance = advance
        self._nonces = _Nonces()

    @property
    def address(self) -> str:
        return str(self.account.address)

    def as_signer(self, account: LocalAccount) -> ChainClient:
        """Same chain, another key (a payout account, or a non-owner in tests); nonces stay shared."""
        other = ChainClient(self.w3, account, self.cfg, self.chain_id, self._advance)
        other._nonces = self._nonces
        return other

    # ------------------------------------------------------------ reading

    def contract(self, address: str, abi: Sequence[Mapping[str, Any]]) -> Contract:
        return self.w3.eth.contract(address=Web3.to_checksum_address(address), abi=list(abi))

    def call(self, fn: ContractFunction, block: BlockIdentifier = "latest") -> Any:
        """Run a view function; reverts and transport errors become ChainError."""
        try:
            return fn.call({"from": self.address}, block_identifier=block)
        except _CAUGHT as exc:
            raise _to_chain_error(exc, f"call {fn.fn_name}") from exc

    def logs(
        self,
        event: ContractEvent,
        argument_filters: Mapping[str, Any] | None = None,
        from_block: int = 0,
        to_block: int | str = "latest",
    ) -> list[EventData]:
        try:
            return list(
                event.get_logs(argument_filters=dict(argument_filters or {}), from_block=from_block, to_block=to_block)
            )
        except _CAUGHT as exc:
            raise _to_chain_error(exc, f"logs {event.event_name}") from exc

    def block_number(self) -> int:
        try:
            return int(self.w3.eth.block_number)
        except _CAUGHT as exc:
            raise _to_chain_error(exc, "block_number") from exc

    def code_at(self, address: str) -> bytes:
        try:
            return bytes(self.w3.eth.get_code(Web3.to_checksum_address(address)))
        except _CAUGHT as exc:
            raise _to_chain_error(exc, "get_code") from exc

    def balance(self, address: str) -> int:
        try:
            return int(self.w3.eth.get_balance(Web3.to_checksum_address(address)))
        except _CAUGHT as exc:
            raise _to_chain_error(exc, "balance") from exc

    # ------------------------------------------------------------ writing

    def transact(
        self,
        fn: ContractFunction,
        value: int = 0,
        signer: LocalAccount | None = None,
        gas: int | None = None,
        expect_logs: bool = True,
    ) -> Receipt:
        """Send a contract call; ``expect_logs`` lets a status-less receipt be judged."""
        signer = signer or self.account
        # Every field is given so web3 only encodes here and asks the node nothing.
        local = {"from": signer.address, "value": value, "gas": 1, "gasPrice": 1, "nonce": 0, "chainId": self.chain_id}
        try:
            tx = fn.build_transaction(cast(TxParams, local))
        except _CAUGHT as exc:
            raise _to_chain_error(exc, f"encode {fn.fn_name}") from exc
        receipt = self._send({"to": tx["to"], "data": tx["data"], "value": value}, signer, gas, expect_logs)
        return _receipt(receipt)

    def deploy(self, abi: Sequence[Mapping[str, Any]], bytecode: str, *args: Any) -> tuple[str, Receipt]:
        """Deploy a contract and check that code landed at the new address."""
        factory = self.w3.eth.contract(abi=list(abi), bytecode=bytecode)
        try:
            data = factory.constructor(*args).data_in_transaction
        except _CAUGHT as exc:
            raise _to_chain_error(exc, "encode constructor") from exc
        raw = self._send({"data": data, "value": 0}, self.account, None, expect_logs=False)
        address = raw.get("contractAddress")
        if not isinstance(address, str) or not Web3.is_address(address):
            raise ChainError(f"deploy receipt has no contract address: {address!r}")
        if len(self.code_at(address)) == 0:
            raise ChainError(f"no code at deployed address {address} (constructor reverted?)", reverted=True)
        return Web3.to_checksum_address(address), _receipt(raw)

    def send_value(self, to: str, value_wei: int, signer: LocalAccount | None = None) -> Receipt:
        """Plain ether transfer, e.g. to give a payout account gas for withdraw()."""
        tx = {"to": Web3.to_checksum_address(to), "value": value_wei}
        return _receipt(self._send(tx, signer or self.account, _TRANSFER_GAS, expect_logs=False))

    def new_account(self) -> LocalAccount:
        """A fresh local key (payout accounts in tests and demos)."""
        return cast(LocalAccount, Account.create())

    # ------------------------------------------------------------ internals

    def _send(self, fields: Mapping[str, Any], signer: LocalAccount, gas: int | None, expect_logs: bool) -> TxReceipt:
        # A plain dict while it is filled in; web3's TxParams only at the call boundaries.
        tx: dict[str, Any] = {**fields, "from": signer.address, "chainId": self.chain_id}
        if gas is None:
            self._dry_run(tx)
            gas = self._estimate(tx)
        tx["gas"] = gas
        tx["gasPrice"] = self._gas_price()
        tx_hash = self._sign_and_send(tx, signer)
        try:
            receipt = self._wait(tx_hash)
        except ChainError:
            # Not mined in time. The node may have dropped it (EthereumJS 0.9.0 does not put back
            # the transactions of a block a reorg removed, and a restarted node forgets its pool);
            # counting on from our own nonce would leave a gap that no later transaction passes,
            # for ever. The next send reads the nonce from the chain again.
            with self._nonces.lock:
                self._nonces.next.pop(signer.address, None)
            raise
        self._check_success(tx, receipt, expect_logs)
        return receipt

    def _dry_run(self, tx: Mapping[str, Any]) -> None:
        """eth_call first, so a revert costs no gas and keeps its reason. Nodes disagree on how a
        revert looks: eth-tester and geth raise, EthereumJS 0.9.0 returns the Error(string) data as
        if it were a result (and its eth_estimateGas does not fail at all)."""
        call = {k: v for k, v in tx.items() if k in ("from", "to", "data", "value")}
        try:
            result = bytes(self.w3.eth.call(cast(TxParams, call), block_identifier="latest"))
        except _CAUGHT as exc:
            raise _to_chain_error(exc, "dry run") from exc
        reason = _decode_revert(result)
        if reason is not None:
            raise ChainError(f"dry run: reverted: {reason}", reverted=True)

    def _estimate(self, tx: Mapping[str, Any]) -> int:
        """Estimation doubles as a dry run: a revert here costs no gas and carries its reason."""
        try:
            estimate = int(self.w3.eth.estimate_gas(cast(TxParams, dict(tx))))
        except _CAUGHT as exc:
            raise _to_chain_error(exc, "estimate gas") from exc
        return estimate * _GAS_MARGIN_NUM // _GAS_MARGIN_DEN + _GAS_MARGIN_ADD

    def _gas_price(self) -> int:
        if self.cfg.gas_price_wei is not None:
            return self.cfg.gas_price_wei
        try:
            return int(self.w3.eth.gas_price)
        except _CAUGHT as exc:
            raise _to_chain_error(exc, "gas price (set gas_price_wei for this node)") from exc

    def _sign_and_send(self, tx: dict[str, Any], signer: LocalAccount) -> bytes:
        # The lock spans nonce, signing and sending so nonces reach the node in order.
        with self._nonces.lock:
            try:
                nonce = self._nonces.next.get(signer.address)
                if nonce is None:
                    nonce = int(self.w3.eth.get_transaction_count(signer.address, "latest"))
                tx["nonce"] = nonce
                signed = signer.sign_transaction(tx)
                tx_hash = bytes(self.w3.eth.send_raw_transaction(signed.raw_transaction))
            except _CAUGHT as exc:
                self._nonces.next.pop(signer.address, None)  # resync from the node next time
                raise _to_chain_error(exc, "send transaction") from exc
            self._nonces.next[signer.address] = nonce + 1
            return tx_hash

    def _wait(self, tx_hash: bytes) -> TxReceipt:
        """Receipt, then ``confirmations`` more blocks; re-read so a reorged-out receipt is waited for again."""
        deadline = time.monotonic() + self.cfg.receipt_timeout_s
        while True:
            receipt = self._poll_receipt(tx_hash, deadline)
            if self.cfg.confirmations == 0:
                return receipt
            target = int(receipt["blockNumber"]) + self.cfg.confirmations
            while self.block_number() < target:
                if time.monotonic() >= deadline:
                    raise ChainError(f"0x{tx_hash.hex()} not {self.cfg.confirmations} blocks deep in time")
                self._advance()
            again = self._poll_receipt(tx_hash, deadline)
            if again["blockHash"] == receipt["blockHash"]:
                return again

    def _poll_receipt(self, tx_hash: bytes, deadline: float) -> TxReceipt:
        """Poll until mined. Node errors count as "not yet": EthereumJS 0.9.0 answers "value for
        <block hash> not found in DB" for a moment after it indexes a transaction."""
        last = "not mined yet"
        while True:
            try:
                receipt = self.w3.eth.get_transaction_receipt(HexBytes(tx_hash))
                if receipt.get("blockNumber") is not None:
                    return receipt
            except TransactionNotFound:
                pass
            except _CAUGHT as exc:
                last = f"{type(exc).__name__}: {_revert_text(exc)}"
            if time.monotonic() >= deadline:
                raise ChainError(f"no receipt for 0x{tx_hash.hex()} after {self.cfg.receipt_timeout_s}s ({last})")
            time.sleep(self.cfg.poll_interval_s)

    def _check_success(self, tx: Mapping[str, Any], receipt: TxReceipt, expect_logs: bool) -> None:
        status = receipt.get("status")
        if status == 1:
            return
        if status is None:
            # EthereumJS 0.9.0: no status field (see module docstring).
            gas_used = int(receipt["gasUsed"])
            plain_transfer = not tx.get("data") and gas_used == _TRANSFER_GAS  # always uses all its gas
            out_of_gas = gas_used >= int(tx["gas"]) and not plain_transfer
            silent = expect_logs and len(receipt.get("logs") or []) == 0
            if not out_of_gas and not silent:
                return
        reason = self._replay_reason(tx, int(receipt["blockNumber"]))
        raise ChainError(f"transaction 0x{bytes(receipt['transactionHash']).hex()} failed: {reason}", reverted=True)

    def _replay_reason(self, tx: Mapping[str, Any], block_number: int) -> str:
        call = {k: v for k, v in tx.items() if k in ("from", "to", "data", "value", "gas")}
        try:
            result = bytes(self.w3.eth.call(cast(TxParams, call), block_identifier=max(block_number - 1, 0)))
        except _CAUGHT as exc:
            return _revert_text(exc)
        return _decode_revert(result) or "reverted (no reason available)"


def connect(cfg: ChainConfig) -> ChainClient:
    """Build a ChainClient for ``cfg``; the embedded chain is fresh per call."""
    if cfg.kind == "embedded":
        return _connect_embedded(cfg)
    return _connect_rpc(cfg)


def _connect_embedded(cfg: ChainConfig) -> ChainClient:
    provider = EthereumTesterProvider()
    tester = provider.ethereum_tester
    assert tester is not None  # EthereumTesterProvider() always makes one
    # py-evm is not thread-safe: a read (the audit, the dashboard) interleaved with a send made
    # sends fail ("invalid transaction nonce") or requests answer 500. Every request to the
    # in-process chain, reads included, and every mined block go through one lock. (Patched
    # before the first request: web3 caches the provider's request function on first use.)
    lock = threading.RLock()
    unlocked = provider.make_request

    def make_request(method: Any, params: Any) -> Any:
        with lock:
            return unlocked(method, params)

    provider.make_request = make_request  # type: ignore[method-assign]
    w3 = Web3(provider)
    account = cast(LocalAccount, Account.from_key(cfg.private_key) if cfg.private_key else Account.create())
    chain_id = _check_chain_id(w3, cfg)

    def mine_one() -> None:
        # Nothing else mines in-process, so waiting for depth means making blocks.
        with lock:
            tester.mine_blocks(1)

    client = ChainClient(w3, account, cfg, chain_id, mine_one)
    funder = tester.get_accounts()[0]
    try:
        funding = {"from": funder, "to": account.address, "value": EMBEDDED_FUNDING_WEI}
        tx_hash = w3.eth.send_transaction(cast(TxParams, funding))
        w3.eth.wait_for_transaction_receipt(tx_hash, timeout=cfg.receipt_timeout_s)
    except _CAUGHT as exc:
        raise _to_chain_error(exc, "fund embedded account") from exc
    return client


def _connect_rpc(cfg: ChainConfig) -> ChainClient:
    assert cfg.rpc_url is not None and cfg.private_key is not None  # checked by ChainConfig
    w3 = Web3(HTTPProvider(cfg.rpc_url, request_kwargs={"timeout": max(cfg.receipt_timeout_s, 10.0)}))
    if cfg.poa:
        w3.middleware_onion.inject(ExtraDataToPOAMiddleware, layer=0)
    try:
        account: LocalAccount = Account.from_key(cfg.private_key)
    except (ValueError, TypeError) as exc:
        raise ChainError(f"bad private key: {type(exc).__name__}") from None
    try:
        chain_id = _check_chain_id(w3, cfg)
    except ChainError as exc:
        if cfg.chain_id is None or "expects" in str(exc):
            raise
        # The node is down: with the chain id fixed by config, start anyway; transactions wait.
        log.warning("chain node unreachable at start-up (%s); continuing with chain id %d", exc, cfg.chain_id)
        chain_id = cfg.chain_id
    poll = cfg.poll_interval_s
    return ChainClient(w3, account, cfg, chain_id, lambda: time.sleep(poll))


def _check_chain_id(w3: Web3, cfg: ChainConfig) -> int:
    try:
        chain_id = int(w3.eth.chain_id)
    except _CAUGHT as exc:
        raise _to_chain_error(exc, "chain id") from exc
    if cfg.chain_id is not None and chain_id != cfg.chain_id:
        raise ChainError(f"node is on chain {chain_id}, config expects {cfg.chain_id}")
    return chain_id


def _receipt(raw: TxReceipt) -> Receipt:
    return Receipt(
        tx_hash=bytes(raw["transactionHash"]),
        block_number=int(raw["blockNumber"]),
        gas_used=int(raw["gasUsed"]),
    )


_ERROR_SELECTOR = bytes.fromhex("08c379a0")  # Error(string)
_PANIC_SELECTOR = bytes.fromhex("4e487b71")  # Panic(uint256)


def _decode_revert(data: bytes) -> str | None:
    """Reason from revert data returned as a call result; None if ``data`` is not revert data.
    Only an exactly well-formed Error(string)/Panic(uint256) encoding counts, so a real return
    value is not mistaken for one (crowdfl's state-changing functions return nothing)."""
    if data[:4] == _PANIC_SELECTOR and len(data) == 36:
        return f"panic 0x{int.from_bytes(data[4:], 'big'):02x}"
    if data[:4] != _ERROR_SELECTOR or len(data) < 68 or (len(data) - 4) % 32:
        return None
    offset = int.from_bytes(data[4:36], "big")
    length = int.from_bytes(data[36:68], "big")
    if offset != 32 or 68 + length > len(data) or len(data) - 68 - length >= 32:
        return None
    try:
        return data[68 : 68 + length].decode("utf-8") or "reverted"
    except UnicodeDecodeError:
        return None


def _revert_text(exc: BaseException) -> str:
    message = getattr(exc, "message", None) or (exc.args[0] if exc.args else "") or type(exc).__name__
    text = str(message)
    for prefix in _REVERT_PREFIXES:
        if text.startswith(prefix):
            return text[len(prefix) :].strip() or "reverted"
    return text


def _to_chain_error(exc: BaseException, doing: str) -> ChainError:
    if isinstance(exc, (_TesterTransactionFailed, ContractLogicError)):
        return ChainError(f"{doing}: reverted: {_revert_text(exc)}", reverted=True)
    return ChainError(f"{doing}: {type(exc).__name__}: {_revert_text(exc)}")
