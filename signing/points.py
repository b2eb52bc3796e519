"""Strict Ed25519 encodings: what a public key or a signature must be before we rely on it.

An Ed25519 verifier accepts some encodings that no honest signer produces. The dangerous one is
a public key of small order (the identity point, or one of the seven other points whose order
divides 8): a "signature" whose R is such a point and whose S is 0 then verifies for *every*
message, so a device enrolled with such a key could be impersonated by anyone. RFC 8032 leaves
these checks to the application; libsodium and the "strict" profile of ZIP-215 make them, and so
do we, everywhere a key is accepted (key files, keyrings, device enrollment and pre-authorization)
and for every signature verified (release envelopes, device proofs):

- a point is canonical: its y coordinate below p = 2^255 - 19, and no "negative zero" (x = 0
  with the sign bit set);
- a point decodes to the curve;
- a public key is in the prime-order subgroup: [L]A is the identity (so it has no small-order
  component) and A itself is not the identity;
- a signature's R is canonical and not of small order, and its S is below L (RFC 8032 §5.1.7).

Each check returns the problem as text (``None``: none), so each caller raises its own error
(a key file error, a keyring error, a 422 on the API). The arithmetic here is plain Python on
extended coordinates, for validation only (never for signing: it is not constant-time, and needs
not be, as it only ever sees public values).
"""

from __future__ import annotations

P = 2**255 - 19
L = 2**252 + 27742317777372353535851937790883648493  # the order of the base point's subgroup
_D = -121665 * pow(121666, P - 2, P) % P
_SQRT_M1 = pow(2, (P - 1) // 4, P)
_IDENTITY = (0, 1, 1, 0)

Point = tuple[int, int, int, int]  # extended coordinates (X, Y, Z, T), x = X/Z, y = Y/Z, xy = T/Z


def _add(p: Point, q: Point) -> Point:
    """Point addition on the twisted Edwards curve (complete: holds for every pair)."""
    x1, y1, z1, t1 = p
    x2, y2, z2, t2 = q
    a = (y1 - x1) * (y2 - x2) % P
    b = (y1 + x1) * (y2 + x2) % P
    c = 2 * t1 * t2 * _D % P
    d = 2 * z1 * z2 % P
    e, f, g, h = b - a, d - c, d + c, b + a
    return (e * f % P, g * h % P, f * g % P, e * h % P)


def _multiply(scalar: int, point: Point) -> Point:
    result = _IDENTITY
    while scalar:
        if scalar & 1:
            result = _add(result, point)
        point = _add(point, point)
        scalar >>= 1
    return result


def _is_identity(point: Point) -> bool:
    x, y, z, _ = point
    return x % P == 0 and (y - z) % P == 0


def _decode(encoded: bytes) -> Point | str:
    """The point ``encoded`` names, or what is wrong with the encoding."""
    if len(encoded) != 32:
        return f"{len(encoded)} bytes, not 32"
    y = int.from_bytes(encoded, "little")
    sign, y = y >> 255, y & ((1 << 255) - 1)
    if y >= P:
        return "non-canonical encoding (y not below 2^255 - 19)"
    x2 = (y * y - 1) * pow(_D * y * y + 1, P - 2, P) % P
    if x2 == 0:
        if sign:
            return "non-canonical encoding (x = 0 with the sign bit set)"
        return (0, y, 1, 0)
    x = pow(x2, (P + 3) // 8, P)
    if (x * x - x2) % P:
        x = x * _SQRT_M1 % P
    if (x * x - x2) % P:
        return "not a point on the curve"
    if x & 1 != sign:
        x = P - x
    return (x, y, 1, x * y % P)


def _small_order(point: Point) -> bool:
    return _is_identity(_multiply(8, point))


def public_key_problem(raw: bytes) -> str | None:
    """What makes ``raw`` (32 bytes) unfit as an Ed25519 public key, or ``None``."""
    point = _decode(raw)
    if isinstance(point, str):
        return point
    if _small_order(point):
        return "a small-order point (a signature by it would verify for any message)"
    if not _is_identity(_multiply(L, point)):
        return "not in the prime-order subgroup (it has a small-order component)"
    return None


def signature_problem(signature: bytes) -> str | None:
    """What makes ``signature`` (R || S, 64 bytes) one no honest signer makes, or ``None``."""
    if len(signature) != 64:
        return f"{len(signature)} bytes, not 64"
    r = _decode(signature[:32])
    if isinstance(r, str):
        return f"R is a {r}" if r.startswith("non-") else f"R: {r}"
    if _small_order(r):
        return "R is a small-order point"
    if int.from_bytes(signature[32:], "little") >= L:
        return "S is not below the group order (non-canonical)"
    return None
