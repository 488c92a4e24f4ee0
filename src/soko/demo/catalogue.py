"""What the demo marketplace holds: its categories, stores, products and accounts.

Prices are whole units of the marketplace's currency (``Settings.default_currency``),
sized for Kenyan shillings; the seed turns them into minor units of that currency.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any


@dataclass(frozen=True)
class DemoCategory:
    slug: str
    name: str
    children: tuple[DemoCategory, ...] = ()


@dataclass(frozen=True)
class DemoVariant:
    sku: str
    options: tuple[tuple[str, str], ...]
    price: int
    stock: int
    compare_at: int | None = None
    weight_grams: int | None = None


@dataclass(frozen=True)
class DemoProduct:
    title: str
    description: str
    category: str  # a category slug
    variants: tuple[DemoVariant, ...]
    # (key, type, value) with type text, number or boolean
    attributes: tuple[tuple[str, str, Any], ...] = ()


@dataclass(frozen=True)
class DemoStore:
    slug: str
    store_name: str
    description: str
    owner_name: str
    owner_email: str
    contact_phone: str
    location: tuple[str, str, str]  # name, kind (warehouse or shop), address
    products: tuple[DemoProduct, ...] = field(default=())


def _sizes(
    prefix: str, sizes: tuple[str, ...], price: int, stock: int, option: str = "size"
) -> tuple[DemoVariant, ...]:
    return tuple(
        DemoVariant(f"{prefix}-{size.upper().replace(' ', '')}", ((option, size),), price, stock)
        for size in sizes
    )


ADMIN_EMAIL = "admin@soko.example"
ADMIN_NAME = "Soko Admin"
BUYER_EMAIL = "amina@soko.example"
BUYER_NAME = "Amina Wanjiru"

CATEGORIES: tuple[DemoCategory, ...] = (
    DemoCategory(
        "food",
        "Food",
        (DemoCategory("fruit", "Fruit"), DemoCategory("vegetables", "Vegetables")),
    ),
    DemoCategory(
        "fashion",
        "Fashion",
        (DemoCategory("shoes", "Shoes"), DemoCategory("fabric", "Fabric and kitenge")),
    ),
    DemoCategory("home", "Home"),
    DemoCategory(
        "electronics",
        "Electronics",
        (DemoCategory("phones", "Phones"), DemoCategory("phone-accessories", "Phone accessories")),
    ),
)

STORES: tuple[DemoStore, ...] = (
    DemoStore(
        slug="mama-mboga",
        store_name="Mama Mboga Fresh",
        description="Fruit and vegetables from Kiambu and Makueni farms, picked the day before.",
        owner_name="Wanjiku Kamau",
        owner_email="wanjiku@soko.example",
        contact_phone="+254712000101",
        location=("Kiambu farm store", "warehouse", "Kiambu Road, Kiambu"),
        products=(
            DemoProduct(
                "Apple mangoes",
                "Sweet, fibre-free apple mangoes from Makueni.",
                "fruit",
                (
                    DemoVariant("MANGO-1KG", (("pack", "1 kg"),), 180, 40, weight_grams=1000),
                    DemoVariant(
                        "MANGO-3KG", (("pack", "3 kg"),), 500, 15, compare_at=540, weight_grams=3000
                    ),
                ),
                (("origin", "text", "Makueni"), ("organic", "boolean", False)),
            ),
            DemoProduct(
                "Hass avocados",
                "Creamy Hass avocados, ready to eat in two or three days.",
                "fruit",
                (
                    DemoVariant("AVO-1KG", (("pack", "1 kg"),), 250, 30, weight_grams=1000),
                    DemoVariant("AVO-2KG", (("pack", "2 kg"),), 450, 12, weight_grams=2000),
                ),
                (("origin", "text", "Murang'a"),),
            ),
            DemoProduct(
                "Sweet bananas",
                "Small sweet bananas (ndizi), by the bunch.",
                "fruit",
                (
                    DemoVariant("BANANA-S", (("bunch", "small"),), 120, 25),
                    DemoVariant("BANANA-L", (("bunch", "large"),), 220, 10),
                ),
            ),
            DemoProduct(
                "Sukuma wiki",
                "Fresh collard greens, washed and tied.",
                "vegetables",
                (
                    DemoVariant("SUKUMA-1", (("bunches", "1"),), 30, 60),
                    DemoVariant("SUKUMA-3", (("bunches", "3"),), 80, 20),
                ),
                (("organic", "boolean", True),),
            ),
            DemoProduct(
                "Tomatoes",
                "Firm red tomatoes for stews and kachumbari.",
                "vegetables",
                (
                    DemoVariant("TOMATO-1KG", (("pack", "1 kg"),), 120, 50, weight_grams=1000),
                    # Sold out: the catalog shows it, and carts cannot take it.
                    DemoVariant("TOMATO-5KG", (("pack", "5 kg crate"),), 550, 0, weight_grams=5000),
                ),
            ),
            DemoProduct(
                "Red onions",
                "Red onions from Kajiado.",
                "vegetables",
                (
                    DemoVariant("ONION-1KG", (("pack", "1 kg"),), 140, 35, weight_grams=1000),
                    DemoVariant("ONION-2KG", (("pack", "2 kg"),), 260, 20, weight_grams=2000),
                ),
            ),
        ),
    ),
    DemoStore(
        slug="kitenge-house",
        store_name="Kitenge House",
        description="Kitenge, kanga and shuka fabric, and shoes made in Kisumu.",
        owner_name="Achieng Otieno",
        owner_email="achieng@soko.example",
        contact_phone="+254722000202",
        location=("Kisumu shop", "shop", "Oginga Odinga Street, Kisumu"),
        products=(
            DemoProduct(
                "Kitenge fabric, 6 yards",
                "Wax-printed cotton kitenge, 6 yards, 45 inches wide.",
                "fabric",
                (
                    DemoVariant(
                        "KITENGE-INDIGO", (("colour", "indigo"),), 1200, 12, compare_at=1500
                    ),
                    DemoVariant("KITENGE-SUNFLOWER", (("colour", "sunflower"),), 1200, 8),
                    DemoVariant("KITENGE-CRIMSON", (("colour", "crimson"),), 1200, 5),
                ),
                (("material", "text", "cotton"), ("length_yards", "number", 6)),
            ),
            DemoProduct(
                "Kanga pair",
                "A pair of kanga with a Swahili saying printed on each.",
                "fabric",
                (
                    DemoVariant("KANGA-BLUE", (("colour", "blue"),), 650, 20),
                    DemoVariant("KANGA-GREEN", (("colour", "green"),), 650, 15),
                ),
            ),
            DemoProduct(
                "Maasai shuka",
                "Warm checked shuka blanket, acrylic.",
                "fabric",
                (
                    DemoVariant("SHUKA-RED", (("colour", "red check"),), 900, 18),
                    DemoVariant("SHUKA-BLUE", (("colour", "blue check"),), 900, 10),
                ),
            ),
            DemoProduct(
                "Leather sandals",
                "Hand-stitched leather sandals with beaded straps.",
                "shoes",
                _sizes("SANDAL", ("38", "39", "40", "41", "42", "43"), 1800, 4),
                (("material", "text", "leather"),),
            ),
            DemoProduct(
                "Akala sandals",
                "Durable sandals with soles cut from tyres.",
                "shoes",
                _sizes("AKALA", ("40", "42", "44"), 700, 10),
            ),
            DemoProduct(
                "Kitenge shirt",
                "Short-sleeved shirt in kitenge print.",
                "fashion",
                _sizes("SHIRT", ("S", "M", "L", "XL"), 2200, 6),
            ),
        ),
    ),
    DemoStore(
        slug="nyumbani-crafts",
        store_name="Nyumbani Crafts",
        description="Baskets, soapstone and woven things for the home, from Kariokor.",
        owner_name="Baraka Mwangi",
        owner_email="baraka@soko.example",
        contact_phone="+254733000303",
        location=("Nairobi workshop", "warehouse", "Kariokor Market, Nairobi"),
        products=(
            DemoProduct(
                "Kiondo basket",
                "Sisal kiondo basket with leather handles.",
                "home",
                (
                    DemoVariant("KIONDO-S", (("size", "small"),), 900, 10),
                    DemoVariant("KIONDO-M", (("size", "medium"),), 1400, 8),
                    DemoVariant("KIONDO-L", (("size", "large"),), 1900, 5),
                ),
                (("material", "text", "sisal"), ("handmade", "boolean", True)),
            ),
            DemoProduct(
                "Kisii soapstone bowl",
                "Carved soapstone bowl, 15 cm across.",
                "home",
                (
                    DemoVariant("SOAPSTONE-NATURAL", (("colour", "natural"),), 1100, 7),
                    DemoVariant("SOAPSTONE-PINK", (("colour", "pink"),), 1100, 6),
                ),
            ),
            DemoProduct(
                "Sisal rug",
                "Flat-woven natural sisal rug.",
                "home",
                (
                    DemoVariant("RUG-60X90", (("size", "60 x 90 cm"),), 2500, 5),
                    DemoVariant("RUG-120X180", (("size", "120 x 180 cm"),), 6500, 3),
                ),
            ),
            DemoProduct(
                "Kikoi towel",
                "Striped cotton kikoi, light and quick to dry.",
                "home",
                (
                    DemoVariant("KIKOI-OCEAN", (("colour", "ocean"),), 950, 14),
                    DemoVariant("KIKOI-SUNSET", (("colour", "sunset"),), 950, 11),
                    DemoVariant("KIKOI-FOREST", (("colour", "forest"),), 950, 9),
                ),
            ),
            DemoProduct(
                "Olive wood salad servers",
                "A pair of salad servers carved from olive wood.",
                "home",
                (DemoVariant("SERVERS", (), 750, 20),),
            ),
        ),
    ),
    DemoStore(
        slug="simu-hub",
        store_name="Simu Hub",
        description="Phones and accessories with a one-year warranty, from Mombasa.",
        owner_name="Fatuma Hassan",
        owner_email="fatuma@soko.example",
        contact_phone="+254744000404",
        location=("Mombasa shop", "shop", "Moi Avenue, Mombasa"),
        products=(
            DemoProduct(
                "Simu 4G smartphone",
                "6.6-inch dual-SIM 4G smartphone with a 5,000 mAh battery.",
                "phones",
                (
                    DemoVariant(
                        "SIMU4G-64-BLACK", (("storage", "64 GB"), ("colour", "black")), 12500, 5
                    ),
                    DemoVariant(
                        "SIMU4G-64-BLUE", (("storage", "64 GB"), ("colour", "blue")), 12500, 5
                    ),
                    DemoVariant(
                        "SIMU4G-128-BLACK",
                        (("storage", "128 GB"), ("colour", "black")),
                        15000,
                        3,
                        compare_at=16500,
                    ),
                    DemoVariant(
                        "SIMU4G-128-BLUE", (("storage", "128 GB"), ("colour", "blue")), 15000, 2
                    ),
                ),
                (("warranty_months", "number", 12), ("dual_sim", "boolean", True)),
            ),
            DemoProduct(
                "Dual-SIM feature phone",
                "A button phone with FM radio and a torch; the battery lasts a week.",
                "phones",
                (
                    DemoVariant("FEATURE-BLACK", (("colour", "black"),), 1800, 25),
                    DemoVariant("FEATURE-RED", (("colour", "red"),), 1800, 15),
                ),
            ),
            DemoProduct(
                "Solar power bank 20,000 mAh",
                "Charges two phones at once, from the wall or from the sun.",
                "phone-accessories",
                (DemoVariant("POWERBANK-20K", (("colour", "black"),), 3200, 12),),
                (("capacity_mah", "number", 20000),),
            ),
            DemoProduct(
                "Phone case",
                "Shock-absorbing case for the Simu 4G.",
                "phone-accessories",
                (
                    DemoVariant("CASE-CLEAR", (("colour", "clear"),), 500, 30),
                    DemoVariant("CASE-BLACK", (("colour", "black"),), 500, 30),
                ),
            ),
            DemoProduct(
                "USB-C cable",
                "Braided USB-C charging cable.",
                "phone-accessories",
                (
                    DemoVariant("USBC-1M", (("length", "1 m"),), 350, 40),
                    DemoVariant("USBC-2M", (("length", "2 m"),), 500, 30),
                ),
            ),
        ),
    ),
)


def category_count(categories: tuple[DemoCategory, ...] = CATEGORIES) -> int:
    return sum(1 + category_count(category.children) for category in categories)


def product_count(stores: tuple[DemoStore, ...] = STORES) -> int:
    return sum(len(store.products) for store in stores)
