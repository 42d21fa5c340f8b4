"""The compiled BLAKE2b (RFC 7693) against known answers.

``Table.digest`` computes what the cache keys entries by: BLAKE2b keyed with 1 to 64
bytes, 32 bytes out. No published vector has that shape: RFC 7693 (Appendix A) gives the
unkeyed BLAKE2b-512 of ``"abc"``, and the BLAKE2 reference's ``blake2b-kat.txt`` gives
keyed BLAKE2b-512 (key ``bytes(range(64))``, input ``bytes(range(n))``). A 32-byte digest
is not a prefix of the 64-byte one (the output length is hashed in, in the parameter
block), so those answers cannot be compared with the C output. Instead:

* hashlib's BLAKE2b gives the published answers (hard-coded below), which makes it the
  reference;
* the C digest equals the reference in the cache's configuration, with the KAT's key and
  inputs, at every length around the 128-byte block boundaries;
* and equals hard-coded answers for that configuration (as hashlib and OpenSSL's
  ``BLAKE2BMAC`` both give them), with the KAT's 64-byte key and the cache's 32-byte key
  size, so the test does not stand on hashlib alone.
"""

from __future__ import annotations

import hashlib

import pytest

from hitpaths import COMPILED_AVAILABLE
from keystile.pytable import PyTable
from keystile.tokens import MAX_TOKEN_LENGTH

compiled_only = pytest.mark.skipif(not COMPILED_AVAILABLE, reason="keystile._speedups not in use")

if COMPILED_AVAILABLE:
    from keystile import _speedups

#: RFC 7693, Appendix A: BLAKE2b-512("abc"), unkeyed.
RFC_ABC_512 = (
    "ba80a53f981c4d0d6a2797b69f12f6e94c212f14685ac4b74b12bb6fdbffa2d1"
    "7d87c5392aab792dc252d5de4533cc9518d38aa8dbf1925ab92386edd4009923"
)

KAT_KEY = bytes(range(64))
#: Input lengths: empty, one byte, either side of half a block, of one block, of two.
LENGTHS = (0, 1, 63, 64, 65, 127, 128, 129, 255)

#: blake2b-kat.txt (the BLAKE2 reference): keyed BLAKE2b-512, KAT_KEY, bytes(range(n)).
OFFICIAL_KEYED_512 = {
    0: "10ebb67700b1868efb4417987acf4690ae9d972fb7a590c2f02871799aaa4786"
    "b5e996e8f0f4eb981fc214b005f42d2ff4233499391653df7aefcbc13fc51568",
    1: "961f6dd1e4dd30f63901690c512e78e4b45e4742ed197c3c5e45c549fd25f2e4"
    "187b0bc9fe30492b16b0d0bc4ef9b0f34c7003fac09a5ef1532e69430234cebd",
    63: "bd965bf31e87d70327536f2a341cebc4768eca275fa05ef98f7f1b71a0351298"
    "de006fba73fe6733ed01d75801b4a928e54231b38e38c562b2e33ea1284992fa",
    64: "65676d800617972fbd87e4b9514e1c67402b7a331096d3bfac22f1abb95374ab"
    "c942f16e9ab0ead33b87c91968a6e509e119ff07787b3ef483e1dcdccf6e3022",
    65: "939fa189699c5d2c81ddd1ffc1fa207c970b6a3685bb29ce1d3e99d42f2f7442"
    "da53e95a72907314f4588399a3ff5b0a92beb3f6be2694f9f86ecf2952d5b41c",
    127: "76d2d819c92bce55fa8e092ab1bf9b9eab237a25267986cacf2b8ee14d214d73"
    "0dc9a5aa2d7b596e86a1fd8fa0804c77402d2fcd45083688b218b1cdfa0dcbcb",
    128: "72065ee4dd91c2d8509fa1fc28a37c7fc9fa7d5b3f8ad3d0d7a25626b57b1b44"
    "788d4caf806290425f9890a3a2a35a905ab4b37acfd0da6e4517b2525c9651e4",
    129: "64475dfe7600d7171bea0b394e27c9b00d8e74dd1e416a79473682ad3dfdbb70"
    "6631558055cfc8a40e07bd015a4540dcdea15883cbbf31412df1de1cd4152b91",
    255: "142709d62e28fcccd0af97fad0f8465b971e82201dc51070faa0372aa43e9248"
    "4be1c1e73ba10906d5d1853db6a4106e0a7bf9800d373d6dee2d46d62ef2a461",
}

#: Keyed BLAKE2b-256 (the cache's configuration), KAT_KEY, bytes(range(n)).
KEYED_256 = {
    0: "2fa9fbd9be36437de204e139e97d402bce68c828f43391608c891b5faed8a98a",
    1: "34758b647135628297fb09c7930cd04e9528e5669112f5b1318493e14de77e55",
    63: "6fb66ed039b6f5a082c3b40bce75df2f68be1cdb63cac4b532942c3b703045ac",
    64: "28c89a7c58f807ae33bc5aae78340e9c565290597436632f4613dbe33192c5db",
    65: "88feea78f5d2fcb7f9cf27953214b14bb1e6d2c1cfde07404ac8dbe02812ab9b",
    127: "7c0bfe069b3ba04e2c88bac200999e2b1c9ef2f96f9ffa69b665efca9230c9ab",
    128: "6a591b356f19ca93ae2bcc7406653ff34aea53cea58bec62803e571d94944165",
    129: "20f607da31ed9652deecf4ef78905d4916ba6f5df37bfc4b610d50ba5447623a",
    255: "fe7b76a61787c089141f9e10fca1e5092488d89c62ea793fb2c5b1f849b4f2cb",
}

#: Keyed BLAKE2b-256 with a 32-byte key (the size the cache draws), bytes(range(32)).
KEY_32 = bytes(range(32))
KEYED_256_KEY_32 = {
    b"": "4e51e7a913fc80137da52880fecca175bf81e117d5c68126dc2774033517ea0d",
    b"abc": "d63a32d3e44738d7907f964316c241adaba0abfeabc32349677578a15a203f7f",
    bytes(range(64)): "7f46f043d63dfb3c9b1102c8824b632cae1fce453e3c0e9dc9e7113f3c1acc36",
    bytes(range(128)): "138893f1631ef3165629515d6ed800da3771b7926dced294205c7507351deebc",
    bytes(range(129)): "ca60f75cbb714330c046d8f28b4ed351a3ee81776bb02a96abb646fe573e3d5c",
}


def test_reference_gives_the_rfc_answer() -> None:
    """The reference BLAKE2b gives RFC 7693's BLAKE2b-512 of "abc"."""
    assert hashlib.blake2b(b"abc").hexdigest() == RFC_ABC_512


@pytest.mark.parametrize("length", LENGTHS)
def test_reference_gives_the_official_keyed_answers(length: int) -> None:
    """The reference BLAKE2b gives the BLAKE2 reference's keyed known answers."""
    digest = hashlib.blake2b(bytes(range(length)), key=KAT_KEY).hexdigest()
    assert digest == OFFICIAL_KEYED_512[length]


@compiled_only
@pytest.mark.parametrize("length", LENGTHS)
def test_c_digest_equals_the_reference(length: int) -> None:
    """With the known-answer key and inputs, the C digest is the reference's keyed
    BLAKE2b-256, on either side of every block boundary."""
    table = _speedups.Table(KAT_KEY, MAX_TOKEN_LENGTH)
    message = bytes(range(length))
    assert table.digest(message) == hashlib.blake2b(message, key=KAT_KEY, digest_size=32).digest()


@compiled_only
@pytest.mark.parametrize("length", LENGTHS)
def test_c_digest_gives_the_known_answers(length: int) -> None:
    """The C digest gives the hard-coded keyed BLAKE2b-256 answers (64-byte key)."""
    table = _speedups.Table(KAT_KEY, MAX_TOKEN_LENGTH)
    assert table.digest(bytes(range(length))).hex() == KEYED_256[length]


@compiled_only
@pytest.mark.parametrize("message", list(KEYED_256_KEY_32), ids=lambda m: f"{len(m)}B")
def test_c_digest_gives_the_known_answers_with_a_32_byte_key(message: bytes) -> None:
    """The C digest gives the hard-coded answers with a 32-byte key, the size the cache
    draws for its key (a key shorter than the block is zero-padded)."""
    table = _speedups.Table(KEY_32, MAX_TOKEN_LENGTH)
    assert table.digest(message).hex() == KEYED_256_KEY_32[message]
    assert table.digest(message) == hashlib.blake2b(message, key=KEY_32, digest_size=32).digest()


@pytest.mark.parametrize("length", LENGTHS)
def test_pure_digest_gives_the_known_answers(length: int) -> None:
    """The pure-Python table's digest gives the same hard-coded answers."""
    assert (
        PyTable(KAT_KEY, MAX_TOKEN_LENGTH).digest(bytes(range(length))).hex() == KEYED_256[length]
    )


@compiled_only
def test_the_output_length_is_hashed_in() -> None:
    """A 32-byte digest is not the 64-byte one cut short, which is why the published
    512-bit answers cannot check the C output directly."""
    table = _speedups.Table(KAT_KEY, MAX_TOKEN_LENGTH)
    assert table.digest(b"").hex() != OFFICIAL_KEYED_512[0][:64]
