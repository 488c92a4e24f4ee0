"""Money: an integer count of minor units and an ISO 4217 currency code.

Amounts never pass through floats. Arithmetic is defined only between amounts of the
same currency; splitting an amount (commissions, split payments) goes through
:meth:`Money.allocate`, which always hands out every minor unit.

Rounding: :meth:`Money.percent_of` rounds half to even by default (banker's rounding),
so a marketplace taking the same commission on many orders does not drift upwards on
average; pass ``rounding=Rounding.half_up`` (half away from zero) where a contract or a
regulator says so.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Sequence
from decimal import Decimal
from enum import StrEnum
from typing import Any, Self

from pydantic import GetCoreSchemaHandler, GetJsonSchemaHandler
from pydantic.json_schema import JsonSchemaValue
from pydantic_core import core_schema

# ISO 4217 minor-unit exponents. Every currency in use in Africa, the main currencies
# of trade, and the three-decimal dinars. A code missing here is refused rather than
# guessed, because a wrong exponent multiplies every price by ten or a hundred.
MINOR_UNITS: dict[str, int] = {
    # Africa
    "AOA": 2,  # Angola, kwanza
    "BIF": 0,  # Burundi, franc
    "BWP": 2,  # Botswana, pula
    "CDF": 2,  # DR Congo, franc
    "CVE": 2,  # Cabo Verde, escudo
    "DJF": 0,  # Djibouti, franc
    "DZD": 2,  # Algeria, dinar
    "EGP": 2,  # Egypt, pound
    "ERN": 2,  # Eritrea, nakfa
    "ETB": 2,  # Ethiopia, birr
    "GHS": 2,  # Ghana, cedi
    "GMD": 2,  # The Gambia, dalasi
    "GNF": 0,  # Guinea, franc
    "KES": 2,  # Kenya, shilling
    "KMF": 0,  # Comoros, franc
    "LRD": 2,  # Liberia, dollar
    "LSL": 2,  # Lesotho, loti
    "LYD": 3,  # Libya, dinar
    "MAD": 2,  # Morocco (and Western Sahara), dirham
    "MGA": 2,  # Madagascar, ariary (ISO lists 2 although its subunit is a fifth)
    "MRU": 2,  # Mauritania, ouguiya (ISO lists 2 although its subunit is a fifth)
    "MUR": 2,  # Mauritius, rupee
    "MWK": 2,  # Malawi, kwacha
    "MZN": 2,  # Mozambique, metical
    "NAD": 2,  # Namibia, dollar
    "NGN": 2,  # Nigeria, naira
    "RWF": 0,  # Rwanda, franc
    "SCR": 2,  # Seychelles, rupee
    "SDG": 2,  # Sudan, pound
    "SHP": 2,  # Saint Helena, pound
    "SLE": 2,  # Sierra Leone, leone (redenominated 2022)
    "SLL": 2,  # Sierra Leone, old leone (still found in older records)
    "SOS": 2,  # Somalia, shilling
    "SSP": 2,  # South Sudan, pound
    "STN": 2,  # Sao Tome and Principe, dobra
    "SZL": 2,  # Eswatini, lilangeni
    "TND": 3,  # Tunisia, dinar
    "TZS": 2,  # Tanzania, shilling
    "UGX": 0,  # Uganda, shilling
    "XAF": 0,  # Central African CFA franc (BEAC)
    "XOF": 0,  # West African CFA franc (BCEAO)
    "ZAR": 2,  # South Africa (and the Common Monetary Area), rand
    "ZMW": 2,  # Zambia, kwacha
    "ZWG": 2,  # Zimbabwe, gold (2024)
    "ZWL": 2,  # Zimbabwe, dollar (withdrawn 2024, still in older records)
    # Currencies of trade and remittance
    "AED": 2,
    "AUD": 2,
    "CAD": 2,
    "CHF": 2,
    "CNY": 2,
    "EUR": 2,
    "GBP": 2,
    "INR": 2,
    "JPY": 0,
    "KRW": 0,
    "SAR": 2,
    "SEK": 2,
    "USD": 2,
    # Three-decimal currencies
    "BHD": 3,
    "IQD": 3,
    "JOD": 3,
    "KWD": 3,
    "OMR": 3,
}


class UnknownCurrencyError(ValueError):
    """The code is not an ISO 4217 currency this platform knows."""


class CurrencyMismatchError(ValueError):
    """Two amounts in different currencies met in one operation."""


class Rounding(StrEnum):
    half_even = "half_even"
    half_up = "half_up"


# The largest amount, in minor units, that an API body may carry, and the largest total
# one checkout may come to: a quadrillion (ten trillion in major units of a two-decimal
# currency), so that sums of thousands of such totals still fit the 64-bit integers
# they are stored in. (A cart's lines alone can add up to more: checkout refuses that.)
MAX_AMOUNT_MINOR = 10**15

_DECIMAL_STRING = re.compile(r"^(-)?(\d+)(?:\.(\d+))?$")


def minor_units(currency: str) -> int:
    """How many decimal places ``currency`` has; refuses codes it does not know."""
    try:
        return MINOR_UNITS[currency]
    except (KeyError, TypeError):
        raise UnknownCurrencyError(f"unknown ISO 4217 currency code {currency!r}") from None


def _round_division(numerator: int, denominator: int, rounding: Rounding) -> int:
    """``numerator / denominator`` rounded to an integer, symmetrically around zero."""
    sign = -1 if (numerator < 0) != (denominator < 0) else 1
    quotient, remainder = divmod(abs(numerator), abs(denominator))
    twice = 2 * remainder
    if twice > abs(denominator) or (
        twice == abs(denominator) and (rounding is Rounding.half_up or quotient % 2 == 1)
    ):
        quotient += 1
    return sign * quotient


class Money:
    """An amount of money: ``amount`` minor units (cents, kobo...) of ``currency``.

    Immutable and hashable. In API schemas it is ``{"amount": 1250, "currency": "KES"}``.
    """

    __slots__ = ("amount", "currency")

    amount: int
    currency: str

    def __init__(self, amount: int, currency: str) -> None:
        if not isinstance(amount, int) or isinstance(amount, bool):
            raise TypeError(f"amount must be an int of minor units, not {type(amount).__name__}")
        minor_units(currency)
        object.__setattr__(self, "amount", amount)
        object.__setattr__(self, "currency", currency)

    def __setattr__(self, name: str, value: Any) -> None:
        raise AttributeError("Money is immutable")

    def __delattr__(self, name: str) -> None:
        raise AttributeError("Money is immutable")

    def __reduce__(self) -> tuple[type[Money], tuple[int, str]]:
        return (Money, (self.amount, self.currency))

    # -- construction and text -----------------------------------------------------------

    @classmethod
    def zero(cls, currency: str) -> Self:
        return cls(0, currency)

    @classmethod
    def parse(cls, text: str, currency: str) -> Self:
        """Read a decimal string such as ``"12.50"`` (or ``"-3"``) without floats.

        More decimals than the currency has are refused unless they are zeros: a price
        of ``"12.505"`` shillings is a mistake to report, not to round.
        """
        exponent = minor_units(currency)
        match = _DECIMAL_STRING.match(text.strip()) if isinstance(text, str) else None
        if match is None:
            raise ValueError(f"{text!r} is not a decimal amount such as '12.50'")
        negative, whole, fraction = match.group(1), match.group(2), match.group(3) or ""
        extra = fraction[exponent:]
        if extra.strip("0"):
            raise ValueError(f"{currency} has {exponent} decimal places; {text!r} has more")
        fraction = fraction[:exponent].ljust(exponent, "0")
        amount = int(whole + fraction)
        return cls(-amount if negative else amount, currency)

    @classmethod
    def from_decimal(cls, value: Decimal, currency: str) -> Self:
        """An exact :class:`~decimal.Decimal` (no rounding happens here)."""
        if not isinstance(value, Decimal) or not value.is_finite():
            raise ValueError(f"{value!r} is not a finite Decimal")
        return cls.parse(format(value, "f"), currency)

    def to_decimal_string(self) -> str:
        """``"12.50"``, ``"-0.05"``, ``"1200"`` for JPY: the exact amount, no symbol."""
        exponent = minor_units(self.currency)
        digits = str(abs(self.amount))
        sign = "-" if self.amount < 0 else ""
        if exponent == 0:
            return sign + digits
        digits = digits.rjust(exponent + 1, "0")
        return f"{sign}{digits[:-exponent]}.{digits[-exponent:]}"

    def as_decimal(self) -> Decimal:
        return Decimal(self.to_decimal_string())

    def __str__(self) -> str:
        return f"{self.to_decimal_string()} {self.currency}"

    def __repr__(self) -> str:
        return f"Money({self.amount!r}, {self.currency!r})"

    # -- comparison ----------------------------------------------------------------------

    def _same_currency(self, other: Money) -> None:
        if self.currency != other.currency:
            raise CurrencyMismatchError(f"cannot combine {self.currency} with {other.currency}")

    def __eq__(self, other: object) -> bool:
        if not isinstance(other, Money):
            return NotImplemented
        return self.amount == other.amount and self.currency == other.currency

    def __hash__(self) -> int:
        return hash((self.amount, self.currency))

    def __lt__(self, other: Money) -> bool:
        if not isinstance(other, Money):
            return NotImplemented
        self._same_currency(other)
        return self.amount < other.amount

    def __le__(self, other: Money) -> bool:
        if not isinstance(other, Money):
            return NotImplemented
        self._same_currency(other)
        return self.amount <= other.amount

    def __gt__(self, other: Money) -> bool:
        if not isinstance(other, Money):
            return NotImplemented
        self._same_currency(other)
        return self.amount > other.amount

    def __ge__(self, other: Money) -> bool:
        if not isinstance(other, Money):
            return NotImplemented
        self._same_currency(other)
        return self.amount >= other.amount

    def __bool__(self) -> bool:
        return self.amount != 0

    @property
    def is_negative(self) -> bool:
        return self.amount < 0

    # -- arithmetic ----------------------------------------------------------------------

    def __add__(self, other: Money) -> Money:
        if not isinstance(other, Money):
            return NotImplemented
        self._same_currency(other)
        return Money(self.amount + other.amount, self.currency)

    def __sub__(self, other: Money) -> Money:
        if not isinstance(other, Money):
            return NotImplemented
        self._same_currency(other)
        return Money(self.amount - other.amount, self.currency)

    def __neg__(self) -> Money:
        return Money(-self.amount, self.currency)

    def __abs__(self) -> Money:
        return Money(abs(self.amount), self.currency)

    def __mul__(self, factor: int) -> Money:
        # Only whole factors: a fractional one would need a rounding rule, which is what
        # percent_of and allocate make explicit.
        if not isinstance(factor, int) or isinstance(factor, bool):
            return NotImplemented
        return Money(self.amount * factor, self.currency)

    __rmul__ = __mul__

    @staticmethod
    def total(amounts: Iterable[Money], currency: str) -> Money:
        """The sum of ``amounts``, all in ``currency``; zero when there are none."""
        result = Money.zero(currency)
        for amount in amounts:
            result = result + amount
        return result

    def percent_of(self, basis_points: int, *, rounding: Rounding = Rounding.half_even) -> Money:
        """``basis_points`` / 10 000 of this amount (250 bp = 2.5 %), rounded to a whole
        minor unit with ``rounding`` (half to even unless told otherwise)."""
        if not isinstance(basis_points, int) or isinstance(basis_points, bool):
            raise TypeError("basis_points must be an int")
        return Money(
            _round_division(self.amount * basis_points, 10_000, Rounding(rounding)), self.currency
        )

    def allocate(self, ratios: Sequence[int]) -> list[Money]:
        """Split into ``len(ratios)`` parts proportional to ``ratios`` that add up to
        exactly this amount (largest-remainder method).

        Each part is within one minor unit of its exact share; leftover units go to the
        parts with the largest remainders, the earlier part first on a tie. A part whose
        ratio is 0 gets 0. Parts keep the sign of the amount.
        """
        if not ratios:
            raise ValueError("allocate needs at least one ratio")
        if any(not isinstance(r, int) or isinstance(r, bool) or r < 0 for r in ratios):
            raise ValueError("ratios must be non-negative ints")
        weight = sum(ratios)
        if weight == 0:
            raise ValueError("at least one ratio must be positive")
        whole = abs(self.amount)
        shares = [divmod(whole * ratio, weight) for ratio in ratios]
        parts = [share for share, _ in shares]
        leftover = whole - sum(parts)
        by_remainder = sorted(range(len(ratios)), key=lambda i: (-shares[i][1], i))
        for index in by_remainder[:leftover]:
            parts[index] += 1
        sign = -1 if self.amount < 0 else 1
        return [Money(sign * part, self.currency) for part in parts]

    # -- pydantic ------------------------------------------------------------------------

    @classmethod
    def __get_pydantic_core_schema__(
        cls, source: type[Any], handler: GetCoreSchemaHandler
    ) -> core_schema.CoreSchema:
        fields = core_schema.typed_dict_schema(
            {
                "amount": core_schema.typed_dict_field(
                    core_schema.int_schema(strict=True, ge=-MAX_AMOUNT_MINOR, le=MAX_AMOUNT_MINOR)
                ),
                "currency": core_schema.typed_dict_field(
                    core_schema.str_schema(pattern=r"^[A-Z]{3}$")
                ),
            },
            extra_behavior="forbid",
        )

        def from_fields(value: dict[str, Any]) -> Money:
            return Money(value["amount"], value["currency"])

        def as_is_or_from_fields(value: Any, from_mapping: Any) -> Money:
            return value if isinstance(value, Money) else from_mapping(value)

        from_dict = core_schema.no_info_after_validator_function(from_fields, fields)
        return core_schema.json_or_python_schema(
            ref="Money",  # one named schema in OpenAPI rather than a copy per field
            json_schema=from_dict,
            # A Money passes as it is; anything else is read as {amount, currency}. Not a
            # union: a union reports each branch's failure, under the branch's own name
            # ("is-instance[Money]", "function-after[...]"), where a client should see
            # one error at the member that is wrong (FastAPI validates in Python mode).
            python_schema=core_schema.no_info_wrap_validator_function(
                as_is_or_from_fields, from_dict
            ),
            serialization=core_schema.plain_serializer_function_ser_schema(
                lambda money: {"amount": money.amount, "currency": money.currency}
            ),
        )

    @classmethod
    def __get_pydantic_json_schema__(
        cls, schema: core_schema.CoreSchema, handler: GetJsonSchemaHandler
    ) -> JsonSchemaValue:
        return {
            "title": "Money",
            "type": "object",
            "properties": {
                "amount": {
                    "type": "integer",
                    "minimum": -MAX_AMOUNT_MINOR,
                    "maximum": MAX_AMOUNT_MINOR,
                    "description": "Amount in the currency's minor units (cents, kobo...)",
                },
                "currency": {
                    "type": "string",
                    "pattern": "^[A-Z]{3}$",
                    "description": "ISO 4217 currency code",
                },
            },
            "required": ["amount", "currency"],
            "additionalProperties": False,
        }
