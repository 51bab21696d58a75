"""A read-only JSON-RPC endpoint over the in-process chain, so the demo's devices and the customer
page can check the chain through a URL of their own, as they would a real node's."""

from __future__ import annotations

import json
import threading
from typing import Any

from werkzeug.wrappers import Request, Response

READ_ONLY = frozenset({"eth_call", "eth_chainId", "eth_blockNumber", "eth_getBlockByNumber", "eth_getLogs", "net_version"})


def rpc_app(w3: Any) -> Any:
    lock = threading.Lock()

    @Request.application  # type: ignore[misc]
    def app(request: Request) -> Response:
        headers = {"Access-Control-Allow-Origin": "*", "Access-Control-Allow-Headers": "Content-Type"}
        if request.method == "OPTIONS":
            return Response("", 204, headers=headers)
        try:
            body = json.loads(request.get_data(as_text=True))
            method, params, ident = body["method"], body.get("params", []), body.get("id", 1)
        except (ValueError, KeyError, TypeError):
            return Response(json.dumps({"jsonrpc": "2.0", "id": None, "error": {"code": -32700, "message": "parse error"}}),
                            400, content_type="application/json", headers=headers)
        if method not in READ_ONLY:
            answer: dict[str, Any] = {"jsonrpc": "2.0", "id": ident, "error": {"code": -32601, "message": f"{method} is not served here"}}
        else:
            if method == "eth_call" and params and isinstance(params[0], dict) and "from" not in params[0]:
                # eth-tester insists on a funded sender; real nodes do not
                params = [{**params[0], "from": w3.eth.accounts[0]}, *params[1:]]
            try:
                with lock:
                    out = w3.provider.make_request(method, params)
                answer = {"jsonrpc": "2.0", "id": ident, **{k: v for k, v in dict(out).items() if k in ("result", "error")}}
            except Exception as exc:  # a revert or a bad parameter is the caller's error, not the server's
                answer = {"jsonrpc": "2.0", "id": ident, "error": {"code": -32000, "message": str(exc)[:300]}}
        return Response(json.dumps(answer, default=_hexify), content_type="application/json", headers=headers)

    return app


def _hexify(value: Any) -> Any:
    if isinstance(value, (bytes, bytearray)):
        return "0x" + bytes(value).hex()
    if hasattr(value, "hex"):
        return value.hex()
    raise TypeError(type(value).__name__)
