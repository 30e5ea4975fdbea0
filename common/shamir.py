"""Shamir's secret sharing for SecAgg+, as Flower shares secrets, at the speed of the ints.

Flower's SecAgg+ (flwr 1.42) splits each site's mask seed and private key with
pycryptodome's pure-Python GF(2^128) arithmetic, and reconstructs every seed from
all the shares that came back, with one field inversion per share. With every site
a neighbour of every other (fedcare's `num_shares=1.0`), that is O(n²) work at each
site and O(n³) at the server per round: measured at 64 sites, 0.62 s per site to
split and 0.31 s per site to combine, about 40 s of a 69 s round on 2 cores.

The same scheme, computed differently:

- a field element is a Python int, bit i the coefficient of x^i; a product is a
  carry-less multiplication looping over the set bits of the *public* operand (a
  share index, a Lagrange coefficient), reduced by two folds of
  x^128 = x^7 + x^2 + x + 1;
- a secret is recombined as Σ λ_j · y_j with the Lagrange coefficients at 0 of the
  share indices, computed once per set of indices (every seed of a round is
  recombined from the same indices) and summed before one reduction.

The bytes are Flower's: a secret is padded to whole 16-byte chunks (PKCS#7), each
chunk is shared with its own polynomial, and a share is the 4-byte little-endian index
followed by one 16-byte big-endian value per chunk. A share made here recombines with
Flower's code and the other way round (tests/test_shamir.py), so a site running either
works with a server running either. `install("site")` and `install("server")` put
them where Flower's SecAgg+ mod and workflow look them up.
"""

from __future__ import annotations

import importlib
import secrets
from functools import lru_cache

from Crypto.Util.Padding import pad, unpad

_CHUNK = 16
_MASK = (1 << 128) - 1


def _reduce(z: int) -> int:
    """z (a carry-less product of two field elements, below 2^255) modulo
    x^128 + x^7 + x^2 + x + 1; two folds always suffice."""
    for _ in range(2):
        high = z >> 128
        z = (z & _MASK) ^ high ^ (high << 1) ^ (high << 2) ^ (high << 7)
    return z


def _clmul(public: int, other: int) -> int:
    """The carry-less product, unreduced; the loop runs over the set bits of `public`."""
    z = 0
    while public:
        low = public & -public
        z ^= other * low  # times a power of two: a shift, no carries
        public ^= low
    return z


def mul(a: int, b: int) -> int:
    """a · b in GF(2^128); a's bits set the running time."""
    return _reduce(_clmul(a, b))


_FIELD = (1 << 128) | 0x87


def inverse(a: int) -> int:
    """a⁻¹ in GF(2^128), by the extended Euclidean algorithm over GF(2)[x]."""
    if not 0 < a <= _MASK:
        raise ValueError("0 has no inverse (or the value is not a field element)")
    u, v, g1, g2 = a, _FIELD, 1, 0
    while u != 1:
        j = u.bit_length() - v.bit_length()
        if j < 0:
            u, v, g1, g2, j = v, u, g2, g1, -j
        u ^= v << j
        g1 ^= g2 << j
    return g1


@lru_cache(maxsize=256)
def _lagrange_at_zero(xs: tuple[int, ...]) -> tuple[int, ...]:
    """λ_j = Π_{m≠j} x_m / (x_j + x_m): p(0) = Σ λ_j p(x_j) for p of degree < len(xs)."""
    out = []
    for j, xj in enumerate(xs):
        num = den = 1
        for m, xm in enumerate(xs):
            if m != j:
                num, den = mul(xm, num), mul(xj ^ xm, den)
        out.append(mul(inverse(den), num))
    return tuple(out)


def create_shares(secret: bytes, threshold: int, num: int) -> list[bytes]:
    """`num` shares of `secret`, any `threshold` of which recombine it (Flower's
    `create_shares`, same bytes layout, coefficients from the OS's CSPRNG)."""
    if not 1 <= threshold <= num < 2 ** 32:
        raise ValueError(f"need 1 <= threshold ({threshold}) <= shares ({num}) < 2^32")
    padded = pad(secret, _CHUNK)
    shares = [bytearray(x.to_bytes(4, "little")) for x in range(1, num + 1)]
    for start in range(0, len(padded), _CHUNK):
        # highest degree first, the secret chunk last: Horner's order
        coeffs = [int.from_bytes(secrets.token_bytes(_CHUNK), "big")
                  for _ in range(threshold - 1)]
        coeffs.append(int.from_bytes(padded[start:start + _CHUNK], "big"))
        for x, share in enumerate(shares, 1):
            y = 0
            for c in coeffs:
                y = _reduce(_clmul(x, y)) ^ c
            share += y.to_bytes(_CHUNK, "big")
    return [bytes(share) for share in shares]


def combine_shares(share_list: list[bytes]) -> bytes:
    """The secret behind `share_list` (Flower's `combine_shares`): ValueError for
    shares that are malformed, repeat an index, or do not recombine to a padded secret."""
    if not share_list:
        raise ValueError("no shares to combine")
    size = len(share_list[0])
    if size < 4 + _CHUNK or (size - 4) % _CHUNK or any(len(s) != size for s in share_list):
        raise ValueError("shares must all be one 4-byte index and whole 16-byte chunks long")
    xs = tuple(int.from_bytes(s[:4], "little") for s in share_list)
    if 0 in xs or len(set(xs)) != len(xs):
        raise ValueError("shares must have distinct, non-zero indices")
    lambdas = _lagrange_at_zero(xs)
    padded = bytearray()
    for start in range(4, size, _CHUNK):
        z = 0
        for lam, share in zip(lambdas, share_list):
            z ^= _clmul(lam, int.from_bytes(share[start:start + _CHUNK], "big"))
        padded += _reduce(z).to_bytes(_CHUNK, "big")
    try:
        return unpad(bytes(padded), _CHUNK)
    except ValueError:
        raise ValueError("Failed to combine shares") from None


_FLOWER = "flwr.common.secure_aggregation.crypto.shamir"
_USERS = {  # who shares (the sites' SecAgg+ mod) and who recombines (the server's workflow)
    "site": ("flwr.client.mod.secure_aggregation.secaggplus_mod", "create_shares", create_shares),
    "server": ("flwr.server.workflow.secure_aggregation.secaggplus_workflow", "combine_shares",
               combine_shares),
}


def install(role: str) -> None:
    """Flower's SecAgg+ mod (`role` "site") or workflow ("server") uses this module's
    function. Refuses (RuntimeError) if that module no longer holds Flower's own
    function under that name: a Flower whose layout changed must be looked at, not
    patched blindly."""
    module_name, name, ours = _USERS[role]
    module = importlib.import_module(module_name)
    current = getattr(module, name, None)
    if current is ours:
        return
    if current is not getattr(importlib.import_module(_FLOWER), name):
        raise RuntimeError(f"{module_name}.{name} is not Flower's {_FLOWER}.{name}: this "
                           "Flower is not the one fedcare's SecAgg+ sharing was checked "
                           "against (flwr 1.42)")
    setattr(module, name, ours)
