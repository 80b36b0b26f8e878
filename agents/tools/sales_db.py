"""A sample SQLite sales database for the retrieval agent, generated from a fixed seed on first use.

Tables: regions, products, customers, orders (about 5,000 over calendar year 2025), and a view `sales` that
joins them into one flat table, so a small model can answer most questions without writing a join.
"""

from __future__ import annotations

import datetime as dt
import os
import random
import sqlite3
import tempfile
from pathlib import Path

DEFAULT_SEED = 2025
ORDER_COUNT = 5000
CUSTOMER_COUNT = 200

REGIONS = [("North", 1.0), ("South", 0.8), ("East", 1.3), ("West", 1.1), ("Central", 0.6)]  # name, order weight
PRODUCTS = [  # name, category, unit price
    ("Laptop", "Electronics", 1200.00), ("Monitor", "Electronics", 300.00), ("Keyboard", "Electronics", 45.00),
    ("Mouse", "Electronics", 25.00), ("Headphones", "Electronics", 80.00), ("Webcam", "Electronics", 60.00),
    ("Desk", "Furniture", 450.00), ("Office Chair", "Furniture", 250.00), ("Bookshelf", "Furniture", 150.00),
    ("Filing Cabinet", "Furniture", 180.00), ("Desk Lamp", "Furniture", 40.00),
    ("Paper Ream", "Office Supplies", 6.50), ("Pens Box", "Office Supplies", 8.00),
    ("Stapler", "Office Supplies", 12.00), ("Notebook", "Office Supplies", 4.00),
    ("Printer Ink", "Office Supplies", 35.00),
    ("Antivirus License", "Software", 50.00), ("Office Suite", "Software", 150.00),
    ("Cloud Storage Plan", "Software", 100.00), ("Design Tool", "Software", 300.00),
]
MONTH_WEIGHTS = [0.8, 0.8, 1.0, 1.0, 1.0, 0.9, 0.8, 0.9, 1.1, 1.2, 1.4, 1.6]  # a busy fourth quarter
NAME_PARTS = (["Acme", "Blue", "Cedar", "Delta", "Evergreen", "Falcon", "Granite", "Harbor", "Iron", "Juniper"],
              ["Logistics", "Foods", "Health", "Labs", "Media", "Motors", "Retail", "Systems", "Textiles", "Works"])

SCHEMA = """
CREATE TABLE regions (region_id INTEGER PRIMARY KEY, name TEXT NOT NULL UNIQUE);
CREATE TABLE products (product_id INTEGER PRIMARY KEY, name TEXT NOT NULL, category TEXT NOT NULL,
                       unit_price REAL NOT NULL);
CREATE TABLE customers (customer_id INTEGER PRIMARY KEY, name TEXT NOT NULL,
                        region_id INTEGER NOT NULL REFERENCES regions(region_id));
CREATE TABLE orders (order_id INTEGER PRIMARY KEY, order_date TEXT NOT NULL,
                     customer_id INTEGER NOT NULL REFERENCES customers(customer_id),
                     product_id INTEGER NOT NULL REFERENCES products(product_id),
                     quantity INTEGER NOT NULL, unit_price REAL NOT NULL, amount REAL NOT NULL);
CREATE INDEX orders_date ON orders(order_date);
CREATE VIEW sales AS
  SELECT o.order_id, o.order_date, substr(o.order_date, 1, 7) AS month, r.name AS region,
         c.name AS customer, p.name AS product, p.category, o.quantity, o.unit_price, o.amount
  FROM orders o JOIN customers c USING (customer_id) JOIN regions r USING (region_id)
       JOIN products p USING (product_id);
"""


def ensure_sales_db(path: Path, seed: int = DEFAULT_SEED) -> Path:
    """Create the sample database at `path` unless it exists; returns the path.

    Example: `ctx = ToolContext(db_path=ensure_sales_db(Path(".slmswap/sales.db")))`
    """
    path = Path(path)
    if path.exists():
        return path
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=path.name + ".", suffix=".tmp")
    os.close(fd)
    try:
        _build(Path(tmp), random.Random(seed))
        os.replace(tmp, path)  # atomic: a crash never leaves a half-written database at `path`
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)
    return path


def _build(path: Path, rng: random.Random) -> None:
    conn = sqlite3.connect(path)
    try:
        conn.executescript(SCHEMA)
        conn.executemany("INSERT INTO regions VALUES (?, ?)", [(i, n) for i, (n, _) in enumerate(REGIONS, 1)])
        conn.executemany("INSERT INTO products VALUES (?, ?, ?, ?)",
                         [(i, *p) for i, p in enumerate(PRODUCTS, 1)])
        conn.executemany("INSERT INTO customers VALUES (?, ?, ?)", _customers(rng))
        conn.executemany("INSERT INTO orders VALUES (?, ?, ?, ?, ?, ?, ?)", _orders(rng))
        conn.commit()
    finally:
        conn.close()


def _customers(rng: random.Random) -> list[tuple[int, str, int]]:
    region_ids = list(range(1, len(REGIONS) + 1))
    weights = [w for _, w in REGIONS]
    rows = []
    for customer_id in range(1, CUSTOMER_COUNT + 1):
        name = f"{rng.choice(NAME_PARTS[0])} {rng.choice(NAME_PARTS[1])} {customer_id:03d}"
        rows.append((customer_id, name, rng.choices(region_ids, weights)[0]))
    return rows


def _orders(rng: random.Random) -> list[tuple]:
    popularity = [rng.uniform(0.3, 2.0) for _ in PRODUCTS]
    drafts = []
    for _ in range(ORDER_COUNT):
        product = rng.choices(range(len(PRODUCTS)), popularity)[0]
        price = PRODUCTS[product][2]
        quantity = rng.randint(1, 3) if price >= 200 else rng.randint(1, 20)
        unit_price = round(price * rng.choice([1.0, 1.0, 1.0, 0.95, 0.9]), 2)  # occasional discounts
        drafts.append((_order_date(rng), rng.randint(1, CUSTOMER_COUNT), product + 1, quantity, unit_price,
                       round(quantity * unit_price, 2)))
    drafts.sort(key=lambda d: d[0])  # order ids follow the calendar
    return [(i, *d) for i, d in enumerate(drafts, 1)]


def _order_date(rng: random.Random) -> str:
    month = rng.choices(range(1, 13), MONTH_WEIGHTS)[0]
    next_month = dt.date(2026, 1, 1) if month == 12 else dt.date(2025, month + 1, 1)
    days = (next_month - dt.date(2025, month, 1)).days
    return dt.date(2025, month, rng.randint(1, days)).isoformat()
