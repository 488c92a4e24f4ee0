from __future__ import annotations

import pickle
from decimal import Decimal

import pytest
from hypothesis import given
from hypothesis import strategies as st
from pydantic import BaseModel, ValidationError

from soko.platform.money import (
    MAX_AMOUNT_MINOR,
    MINOR_UNITS,
    CurrencyMismatchError,
    Money,
    Rounding,
    UnknownCurrencyError,
    minor_units,
)

AFRICAN_CURRENCIES = {
    "AOA", "BIF", "BWP", "CDF", "CVE", "DJF", "DZD", "EGP", "ERN", "ETB", "GHS", "GMD",
    "GNF", "KES", "KMF", "LRD", "LSL", "LYD", "MAD", "MGA", "MRU", "MUR", "MWK", "MZN",
    "NAD", "NGN", "RWF", "SCR", "SDG", "SHP", "SLE", "SOS", "SSP", "STN", "SZL", "TND",
    "TZS", "UGX", "XAF", "XOF", "ZAR", "ZMW", "ZWG",
}  # fmt: skip

currencies = st.sampled_from(sorted(MINOR_UNITS))
amounts = st.integers(min_value=-(10**15), max_value=10**15)
money = st.builds(Money, amounts, currencies)


def test_exponents_cover_africa_and_the_named_currencies() -> None:
    assert MINOR_UNITS.keys() >= AFRICAN_CURRENCIES
    assert minor_units("USD") == minor_units("EUR") == minor_units("GBP") == 2
    assert minor_units("JPY") == 0
    assert minor_units("KWD") == minor_units("BHD") == 3
    assert minor_units("UGX") == minor_units("XOF") == minor_units("RWF") == 0
    assert minor_units("TND") == minor_units("LYD") == 3


@pytest.mark.parametrize("code", ["XYZ", "kes", "", "KESS", "usd"])
def test_unknown_currency_codes_are_refused(code: str) -> None:
    with pytest.raises(UnknownCurrencyError):
        Money(100, code)


@pytest.mark.parametrize("amount", [1.5, Decimal("1"), "100", True])
def test_amount_must_be_an_int(amount: object) -> None:
    with pytest.raises(TypeError):
        Money(amount, "KES")  # type: ignore[arg-type]


def test_money_is_immutable_and_hashable() -> None:
    price = Money(1250, "KES")
    with pytest.raises(AttributeError):
        price.amount = 1  # type: ignore[misc]
    assert {price, Money(1250, "KES")} == {price}
    assert pickle.loads(pickle.dumps(price)) == price
    assert Money(1250, "KES") != Money(1250, "TZS")


def test_arithmetic_within_one_currency() -> None:
    a, b = Money(1250, "KES"), Money(750, "KES")
    assert a + b == Money(2000, "KES")
    assert a - b == Money(500, "KES")
    assert b - a == Money(-500, "KES")
    assert -a == Money(-1250, "KES")
    assert a * 3 == 3 * a == Money(3750, "KES")
    assert b < a and a >= b
    assert Money.total([a, b, b], "KES") == Money(2750, "KES")
    assert Money.total([], "NGN") == Money(0, "NGN")


def test_mixing_currencies_raises() -> None:
    kes, ngn = Money(100, "KES"), Money(100, "NGN")
    with pytest.raises(CurrencyMismatchError):
        kes + ngn
    with pytest.raises(CurrencyMismatchError):
        kes - ngn
    with pytest.raises(CurrencyMismatchError):
        assert kes < ngn
    with pytest.raises(CurrencyMismatchError):
        Money.total([kes, ngn], "KES")


def test_multiplication_only_by_whole_numbers() -> None:
    with pytest.raises(TypeError):
        Money(100, "KES") * 1.5  # type: ignore[operator]
    with pytest.raises(TypeError):
        Money(100, "KES") * Money(2, "KES")  # type: ignore[operator]


@pytest.mark.parametrize(
    ("text", "currency", "amount"),
    [
        ("12.50", "KES", 1250),
        ("12.5", "KES", 1250),
        ("12", "KES", 1200),
        ("0.05", "USD", 5),
        ("-0.05", "USD", -5),
        ("1200", "JPY", 1200),
        ("1200.000", "JPY", 1200),
        ("1.234", "KWD", 1234),
        ("12.500", "KES", 1250),
        ("99999999999999999999.99", "USD", 9999999999999999999999),
    ],
)
def test_parse_decimal_strings(text: str, currency: str, amount: int) -> None:
    assert Money.parse(text, currency) == Money(amount, currency)


@pytest.mark.parametrize(
    ("text", "currency"),
    [
        ("12.505", "KES"),
        ("1200.5", "JPY"),
        ("1e3", "KES"),
        ("12,50", "KES"),
        ("", "KES"),
        (".5", "KES"),
        ("NaN", "KES"),
        ("1.2.3", "KES"),
        ("+-1", "KES"),
    ],
)
def test_parse_refuses_bad_or_too_precise_text(text: str, currency: str) -> None:
    with pytest.raises(ValueError):
        Money.parse(text, currency)


@pytest.mark.parametrize(
    ("money", "text"),
    [
        (Money(1250, "KES"), "12.50"),
        (Money(5, "USD"), "0.05"),
        (Money(-5, "USD"), "-0.05"),
        (Money(0, "EUR"), "0.00"),
        (Money(1200, "JPY"), "1200"),
        (Money(-7, "UGX"), "-7"),
        (Money(1, "KWD"), "0.001"),
        (Money(123456, "BHD"), "123.456"),
    ],
)
def test_format_as_decimal_string(money: Money, text: str) -> None:
    assert money.to_decimal_string() == text
    assert str(money) == f"{text} {money.currency}"


def test_decimal_interop_is_exact() -> None:
    assert Money.from_decimal(Decimal("19.99"), "GHS") == Money(1999, "GHS")
    assert Money(1999, "GHS").as_decimal() == Decimal("19.99")
    with pytest.raises(ValueError):
        Money.from_decimal(Decimal("19.999"), "GHS")
    with pytest.raises(ValueError):
        Money.from_decimal(Decimal("Infinity"), "GHS")


@given(money)
def test_text_round_trip(value: Money) -> None:
    assert Money.parse(value.to_decimal_string(), value.currency) == value


@pytest.mark.parametrize(
    ("amount", "bp", "half_even", "half_up"),
    [
        (1000, 250, 25, 25),  # exact
        (50, 1000, 5, 5),
        (5, 1000, 0, 1),  # 0.5 -> 0 (even) or 1 (up)
        (15, 1000, 2, 2),  # 1.5 -> 2 either way
        (25, 1000, 2, 3),  # 2.5 -> 2 (even) or 3 (up)
        (-25, 1000, -2, -3),  # symmetric around zero
        (-5, 1000, 0, -1),
        (1999, 333, 67, 67),  # 66.5667 -> 67
        (1, 4999, 0, 0),  # 0.4999 -> 0
        (1, 5001, 1, 1),  # 0.5001 -> 1
    ],
)
def test_percent_of_rounds_explicitly(amount: int, bp: int, half_even: int, half_up: int) -> None:
    price = Money(amount, "KES")
    assert price.percent_of(bp) == Money(half_even, "KES")
    assert price.percent_of(bp, rounding=Rounding.half_even) == Money(half_even, "KES")
    assert price.percent_of(bp, rounding=Rounding.half_up) == Money(half_up, "KES")


@given(amounts, st.integers(min_value=0, max_value=20_000))
def test_percent_of_is_within_half_a_unit(amount: int, bp: int) -> None:
    result = Money(amount, "USD").percent_of(bp).amount
    exact = Decimal(amount) * bp / 10_000
    assert abs(Decimal(result) - exact) <= Decimal("0.5")


def test_allocate_examples() -> None:
    assert Money(100, "KES").allocate([1, 1, 1]) == [
        Money(34, "KES"),
        Money(33, "KES"),
        Money(33, "KES"),
    ]
    # A 10 % commission and the seller's 90 %, on an amount that does not divide evenly.
    assert Money(1004, "NGN").allocate([10, 90]) == [Money(100, "NGN"), Money(904, "NGN")]
    # An exact tie (100.5 and 904.5) goes to the earlier part.
    assert Money(1005, "NGN").allocate([10, 90]) == [Money(101, "NGN"), Money(904, "NGN")]
    assert Money(5, "UGX").allocate([0, 1, 0]) == [
        Money(0, "UGX"),
        Money(5, "UGX"),
        Money(0, "UGX"),
    ]
    assert Money(-100, "KES").allocate([1, 1, 1]) == [
        Money(-34, "KES"),
        Money(-33, "KES"),
        Money(-33, "KES"),
    ]
    # Largest remainder, not first-come: 7 split 2:3:5 is 1.4, 2.1, 3.5 -> 1, 2, 4
    assert [p.amount for p in Money(7, "KES").allocate([2, 3, 5])] == [1, 2, 4]


@pytest.mark.parametrize("ratios", [[], [0, 0], [1, -1], [1.5, 1]])
def test_allocate_refuses_bad_ratios(ratios: list[int]) -> None:
    with pytest.raises(ValueError):
        Money(100, "KES").allocate(ratios)


ratios_lists = st.lists(st.integers(min_value=0, max_value=10_000), min_size=1, max_size=12).filter(
    lambda ratios: sum(ratios) > 0
)


@given(money, ratios_lists)
def test_allocation_sums_to_the_whole(value: Money, ratios: list[int]) -> None:
    parts = value.allocate(ratios)
    assert len(parts) == len(ratios)
    assert all(part.currency == value.currency for part in parts)
    assert Money.total(parts, value.currency) == value


@given(st.integers(min_value=0, max_value=10**15), currencies, ratios_lists)
def test_allocation_of_a_non_negative_amount_has_no_negative_part(
    amount: int, currency: str, ratios: list[int]
) -> None:
    parts = Money(amount, currency).allocate(ratios)
    assert all(part.amount >= 0 for part in parts)
    assert all(part.amount == 0 for part, ratio in zip(parts, ratios, strict=True) if ratio == 0)


@given(money, ratios_lists)
def test_each_part_is_within_one_unit_of_its_exact_share(value: Money, ratios: list[int]) -> None:
    parts = value.allocate(ratios)
    weight = sum(ratios)
    for part, ratio in zip(parts, ratios, strict=True):
        # |part - amount*ratio/weight| < 1, compared in integers
        assert abs(part.amount * weight - value.amount * ratio) < weight


@given(money, st.lists(st.integers(min_value=1, max_value=100), min_size=1, max_size=6))
def test_allocation_is_monotonic_in_the_ratio(value: Money, ratios: list[int]) -> None:
    parts = abs(value).allocate(ratios)
    for part_a, ratio_a in zip(parts, ratios, strict=True):
        for part_b, ratio_b in zip(parts, ratios, strict=True):
            if ratio_a > ratio_b:
                assert part_a.amount >= part_b.amount


class Line(BaseModel):
    price: Money


def test_pydantic_representation() -> None:
    line = Line.model_validate_json('{"price": {"amount": 1250, "currency": "KES"}}')
    assert line.price == Money(1250, "KES")
    assert line.model_dump(mode="json") == {"price": {"amount": 1250, "currency": "KES"}}
    assert line.model_dump() == {"price": {"amount": 1250, "currency": "KES"}}
    assert Line(price=Money(5, "USD")).price == Money(5, "USD")
    assert Line.model_validate({"price": {"amount": 5, "currency": "USD"}}).price == Money(5, "USD")
    # The largest amounts a body may carry, either way.
    for amount in (MAX_AMOUNT_MINOR, -MAX_AMOUNT_MINOR):
        payload = f'{{"price": {{"amount": {amount}, "currency": "KES"}}}}'
        assert Line.model_validate_json(payload).price == Money(amount, "KES")


@pytest.mark.parametrize(
    "payload",
    [
        '{"price": {"amount": 12.5, "currency": "KES"}}',
        '{"price": {"amount": "1250", "currency": "KES"}}',
        '{"price": {"amount": 1250, "currency": "XYZ"}}',
        '{"price": {"amount": 1250, "currency": "kes"}}',
        '{"price": {"amount": 1250}}',
        '{"price": {"amount": 1250, "currency": "KES", "extra": 1}}',
        '{"price": "12.50 KES"}',
        '{"price": {"amount": 1000000000000001, "currency": "KES"}}',
        '{"price": {"amount": -1000000000000001, "currency": "KES"}}',
        '{"price": {"amount": 1180591620717411303424, "currency": "KES"}}',
    ],
)
def test_pydantic_refuses_bad_money(payload: str) -> None:
    with pytest.raises(ValidationError):
        Line.model_validate_json(payload)


@pytest.mark.parametrize(
    ("price", "loc", "kind"),
    [
        ({"amount": "1250", "currency": "KES"}, ("price", "amount"), "int_type"),
        ({"amount": 12.5, "currency": "KES"}, ("price", "amount"), "int_type"),
        ({"amount": 10**16, "currency": "KES"}, ("price", "amount"), "less_than_equal"),
        ({"amount": 1250, "currency": "kes"}, ("price", "currency"), "string_pattern_mismatch"),
        ({"amount": 1250, "currency": "XYZ"}, ("price",), "value_error"),
        ({"amount": 1250, "currency": "KES", "extra": 1}, ("price", "extra"), "extra_forbidden"),
        ("12.50 KES", ("price",), "dict_type"),
    ],
)
def test_bad_money_from_a_parsed_body_is_one_error_at_the_member(
    price: object, loc: tuple[str, ...], kind: str
) -> None:
    """FastAPI validates a parsed body in Python mode: each mistake is one error, at the
    member that is wrong, with no name of the validator's own in its location."""
    with pytest.raises(ValidationError) as caught:
        Line.model_validate({"price": price})
    assert [(error["loc"], error["type"]) for error in caught.value.errors()] == [(loc, kind)]


def test_json_schema_describes_amount_and_currency() -> None:
    schema = Line.model_json_schema()
    money_schema = schema["properties"]["price"]
    if "$ref" in money_schema:
        money_schema = schema["$defs"][money_schema["$ref"].rsplit("/", 1)[1]]
    assert money_schema["type"] == "object"
    assert money_schema["properties"]["amount"]["type"] == "integer"
    assert money_schema["properties"]["amount"]["maximum"] == MAX_AMOUNT_MINOR
    assert money_schema["properties"]["currency"]["type"] == "string"
    assert set(money_schema["required"]) == {"amount", "currency"}
