"""What a failed TLS handshake says, for one error line."""

from __future__ import annotations

import ssl


def tls_reason(err: BaseException) -> str:
    """The innermost TLS error's reason (``certificate has expired``, ``Hostname mismatch,
    certificate is not valid for 'x'``), out of the layers requests and urllib3 wrap it in."""
    return _ssl_reason(err, set()) or str(err)[:200]


def _ssl_reason(err: BaseException, seen: set[int]) -> str | None:
    if id(err) in seen:
        return None
    seen.add(id(err))
    if isinstance(err, ssl.SSLCertVerificationError) and err.verify_message:
        return str(err.verify_message)
    if isinstance(err, ssl.SSLError) and err.reason:
        return str(err.reason)
    inner = [a for a in err.args if isinstance(a, BaseException)]
    inner += [e for e in (getattr(err, "reason", None), err.__cause__, err.__context__)
              if isinstance(e, BaseException)]  # fmt: skip
    for candidate in inner:
        found = _ssl_reason(candidate, seen)
        if found:
            return found
    return None
