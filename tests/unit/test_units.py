"""emulator.units: the one place unit strings are parsed (values checked by hand)."""

from __future__ import annotations

import math

import pytest

from emulator.errors import UnitError
from emulator.units import format_rate, format_size, parse_duration, parse_rate, parse_size


# -- rates -------------------------------------------------------------------
@pytest.mark.parametrize("text, bps", [
    ("400Gbit", 400e9),
    ("40Mbit", 40e6),
    ("1kbit", 1e3),
    ("1Kbit", 1e3),
    ("1.6Tbit", 1.6e12),
    ("1Pbit", 1e15),
    ("1Mbit/s", 1e6),
    ("2Gbps", 2e9),            # bps is bits per second (module docstring)
    ("100bit", 100.0),
    ("400 Gbit", 400e9),       # space between number and unit
    ("  40Mbit  ", 40e6),      # surrounding blanks
    ("1e3Mbit", 1e9),          # exponent in the number
    ("2.5e-1Gbit", 250e6),
])
def test_parse_rate_decimal_prefixes_in_bits(text, bps):
    assert parse_rate(text) == pytest.approx(bps, rel=1e-12)


@pytest.mark.parametrize("text, bps", [
    ("1Kibit", 1024.0),
    ("1Mibit", 1024.0**2),
    ("3Gibit", 3 * 1024.0**3),
    ("1Tibit", 1024.0**4),
])
def test_parse_rate_binary_prefixes(text, bps):
    assert parse_rate(text) == bps


@pytest.mark.parametrize("text, bps", [
    ("50GB/s", 400e9),         # the docstring's example: 50 GB/s = 400 Gbit/s
    ("1B/s", 8.0),
    ("1KiB/s", 8 * 1024.0),
    ("125MB/s", 1e9),
])
def test_parse_rate_bytes_per_second_is_times_eight(text, bps):
    assert parse_rate(text) == pytest.approx(bps, rel=1e-12)


@pytest.mark.parametrize("value", [40, 40.0, "40", " 40 ", "4e2", True, None, float("nan")])
def test_parse_rate_refuses_bare_numbers(value):
    with pytest.raises(UnitError) as exc:
        parse_rate(value)
    msg = str(exc.value)
    assert "has no unit" in msg or "is not a rate" in msg


def test_parse_rate_bare_int_message_says_no_unit():
    with pytest.raises(UnitError, match="has no unit"):
        parse_rate(40)


@pytest.mark.parametrize("text", [
    "400Gb",      # bits or bytes? refused rather than guessed
    "400GB",      # a size, not a rate
    "1mbit",      # lowercase m is not a prefix (milli?)
    "Gbit",
    "fastbit",
    "1.2.3Gbit",
    "400 G bit",
    "nanGbit",
    "infGbit",
    "",
])
def test_parse_rate_refuses_non_rates(text):
    with pytest.raises(UnitError, match="is not a rate"):
        parse_rate(text)


@pytest.mark.parametrize("text", ["0bit", "0Gbit", "0.0Mbit", "0B/s"])
def test_parse_rate_zero_refused_by_default(text):
    with pytest.raises(UnitError, match="> 0"):
        parse_rate(text)


def test_parse_rate_zero_allowed_on_request():
    assert parse_rate("0Gbit", allow_zero=True) == 0.0


@pytest.mark.parametrize("text", ["-5Gbit", "-0.1Mbit", "- 5Gbit"])
def test_parse_rate_negative_refused(text):
    with pytest.raises(UnitError):
        parse_rate(text)


def test_parse_rate_negative_refused_even_when_zero_allowed():
    with pytest.raises(UnitError):
        parse_rate("-5Gbit", allow_zero=True)


def test_parse_rate_overflow_to_infinity_refused():
    # float('1e400') is inf: the bound check must catch it
    with pytest.raises(UnitError, match="> 0"):
        parse_rate("1e400Gbit")


def test_unit_error_is_a_value_error():
    # pydantic turns ValueErrors raised in validators into validation errors
    assert issubclass(UnitError, ValueError)


# -- sizes -------------------------------------------------------------------
@pytest.mark.parametrize("text, size", [
    ("1.3GB", 1.3e9),
    ("64KiB", 65536.0),
    ("512B", 512.0),
    ("64GB", 64e9),
    ("1MiB", 1024.0**2),
    ("2GiB", 2 * 1024.0**3),
    ("1kB", 1e3),
    ("8bit", 1.0),             # bits are divided by 8
    ("400Gbit", 50e9),
])
def test_parse_size(text, size):
    assert parse_size(text) == pytest.approx(size, rel=1e-12)


@pytest.mark.parametrize("value", [64, "64", "64G", "64Gbit/s", "64GB/s"])
def test_parse_size_refuses_non_sizes(value):
    with pytest.raises(UnitError):
        parse_size(value)


def test_parse_size_zero():
    with pytest.raises(UnitError):
        parse_size("0B")
    assert parse_size("0B", allow_zero=True) == 0.0


# -- durations ---------------------------------------------------------------
@pytest.mark.parametrize("text, seconds", [
    ("50ms", 0.05),
    ("3s", 3.0),
    ("2min", 120.0),
    ("1h", 3600.0),
    ("10us", 1e-5),
    ("5ns", 5e-9),
    ("1.5s", 1.5),
    ("10 ms", 0.01),
])
def test_parse_duration(text, seconds):
    assert parse_duration(text) == pytest.approx(seconds, rel=1e-12)


@pytest.mark.parametrize("value", [5, 5.0, "5", "5m", "5sec", "5 hours", "-5s"])
def test_parse_duration_refuses(value):
    with pytest.raises(UnitError):
        parse_duration(value)


def test_parse_duration_zero():
    with pytest.raises(UnitError):
        parse_duration("0s")
    assert parse_duration("0ms", allow_zero=True) == 0.0


# -- formatting --------------------------------------------------------------
@pytest.mark.parametrize("bps, text", [
    (400e9, "400Gbit"),
    (40e6, "40Mbit"),
    (150e6, "150Mbit"),
    (1.6e12, "1.6Tbit"),
    (2e9, "2Gbit"),
    (20e6, "20Mbit"),
    (1e3, "1Kbit"),
    (999.0, "999bit"),
    (0.0, "0bit"),
])
def test_format_rate(bps, text):
    assert format_rate(bps) == text


@pytest.mark.parametrize("bps", [1.0, 999.0, 1e3, 1024.0, 40e6, 100e6, 150e6, 4e11, 1.6e12, 3.2e15,
                                 123456789.0, 999_999_999.0, 7.25e8])
def test_format_rate_round_trips_to_four_significant_digits(bps):
    assert parse_rate(format_rate(bps)) == pytest.approx(bps, rel=5e-4)


@pytest.mark.parametrize("bps", [1.0, 40e6, 150e6, 4e11, 1.6e12, 2.5e9])
def test_format_rate_round_trips_exactly_for_short_values(bps):
    assert parse_rate(format_rate(bps)) == pytest.approx(bps, rel=1e-12)


@pytest.mark.parametrize("size, text", [(1.3e9, "1.3GB"), (64e9, "64GB"), (512.0, "512B"), (262144.0, "262.144KB")])
def test_format_size(size, text):
    assert format_size(size) == text


@pytest.mark.parametrize("size", [512.0, 1.3e9, 64e9, 262144.0])
def test_format_size_round_trips(size):
    assert parse_size(format_size(size)) == pytest.approx(size, rel=5e-4)


def test_parse_rate_result_is_finite_float():
    value = parse_rate("400Gbit")
    assert isinstance(value, float) and math.isfinite(value)
