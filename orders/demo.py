"""Demo products and customers for the local run: ``python -m orders.demo``."""

from __future__ import annotations

from decimal import Decimal

from sqlalchemy import Engine
from sqlalchemy.dialects.postgresql import insert

from config.database import make_engine
from config.settings import load_settings
from orders.tables import customers, products

PRODUCTS = [
    {
        "id": "SKU-1001",
        "name": "Pallet of copy paper",
        "unit_price": Decimal("189.00"),
        "on_hand": 500,
    },
    {"id": "SKU-1002", "name": "Toner cartridge", "unit_price": Decimal("74.90"), "on_hand": 200},
    {"id": "SKU-1003", "name": "Office chair", "unit_price": Decimal("249.00"), "on_hand": 40},
    {"id": "SKU-1004", "name": "Standing desk", "unit_price": Decimal("599.00"), "on_hand": 5},
]

CUSTOMERS = [
    {"id": "ACME", "name": "Acme Corporation", "credit_limit": Decimal("50000.00")},
    {"id": "GLOBEX", "name": "Globex Inc.", "credit_limit": Decimal("5000.00")},
    {"id": "INITECH", "name": "Initech", "credit_limit": Decimal("500.00")},
]


def seed(engine: Engine) -> None:
    """Insert the demo rows that are missing; leave existing ones as they are."""
    with engine.begin() as conn:
        conn.execute(insert(products).values(PRODUCTS).on_conflict_do_nothing())
        conn.execute(insert(customers).values(CUSTOMERS).on_conflict_do_nothing())


if __name__ == "__main__":
    seed(make_engine(load_settings()))
    print(f"seeded {len(PRODUCTS)} products and {len(CUSTOMERS)} customers")
