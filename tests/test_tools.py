"""The sub-agents' tools on a real SQLite file: numbers checked against SQL, refusals, bad calls, schemas."""

from __future__ import annotations

import csv
import hashlib
import io
import json
import sqlite3
from pathlib import Path

import pytest
from jsonschema import Draft202012Validator

from agents.tools import (FORMATTING_TOOLS, PROCESSING_TOOLS, RETRIEVAL_TOOLS, TOOLS_BY_AGENT, VALIDATION_TOOLS,
                          ToolContext, ensure_sales_db, run_tool)
from agents import bounds
from agents.tools import base, sql

ALL_TOOLS = [t for tools in TOOLS_BY_AGENT.values() for t in tools]


@pytest.fixture(scope="module")
def db(tmp_path_factory) -> Path:
    return ensure_sales_db(tmp_path_factory.mktemp("db") / "sales.db")


@pytest.fixture
def ctx(db) -> ToolContext:
    return ToolContext(db_path=db, row_limit=10_000)


def query(db: Path, text: str, *params) -> list[tuple]:
    with sqlite3.connect(db) as conn:
        return conn.execute(text, params).fetchall()


def call(ctx: ToolContext, tool: str, **arguments):
    result = run_tool(ALL_TOOLS, tool, arguments, ctx)
    assert result.ok, result.content
    return result


def digest(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


# ---- the sample database ----------------------------------------------------------------------------------

def dump(path: Path) -> list[str]:
    with sqlite3.connect(path) as conn:
        return list(conn.iterdump())


def test_same_seed_gives_the_same_database_and_another_seed_does_not(tmp_path, db):
    again = ensure_sales_db(tmp_path / "a" / "sales.db")
    other = ensure_sales_db(tmp_path / "b" / "sales.db", seed=7)
    assert dump(again) == dump(db)
    assert digest(again) == digest(db)
    assert dump(other) != dump(db)
    assert sorted(p.name for p in (tmp_path / "a").iterdir()) == ["sales.db"]  # no temp file left behind


def test_existing_database_is_left_alone(tmp_path):
    path = tmp_path / "sales.db"
    path.write_bytes(b"not regenerated")
    assert ensure_sales_db(path) == path
    assert path.read_bytes() == b"not regenerated"


def test_sample_database_has_the_promised_shape(db):
    assert query(db, "SELECT name FROM regions ORDER BY region_id") == [
        ("North",), ("South",), ("East",), ("West",), ("Central",)]
    counts = query(db, "SELECT (SELECT count(*) FROM products), (SELECT count(*) FROM customers), "
                       "(SELECT count(*) FROM orders), (SELECT count(*) FROM sales)")
    assert counts == [(20, 200, 5000, 5000)]
    assert query(db, "SELECT min(order_date), max(order_date) FROM orders")[0][0] >= "2025-01-01"
    assert query(db, "SELECT max(order_date) FROM orders")[0][0] <= "2025-12-31"
    assert query(db, "SELECT count(*) FROM orders WHERE abs(amount - round(quantity * unit_price, 2)) > 1e-9") == [(0,)]
    assert query(db, "SELECT count(DISTINCT region) FROM sales") == [(5,)]


# ---- retrieval ----------------------------------------------------------------------------------------------

def test_list_tables_names_every_table_and_its_columns(ctx):
    content = call(ctx, "list_tables").content
    for table in ("regions", "products", "customers", "orders", "sales"):
        assert table in content
    assert "sales (view): order_id, order_date, month, region" in content


def test_describe_table_gives_columns_count_and_sample(ctx):
    content = call(ctx, "describe_table", table="Products").content
    assert content.startswith("products: 20 rows")
    assert "unit_price REAL" in content
    assert "Laptop" in content


def test_run_sql_saves_rows_under_fresh_names(ctx, db):
    first = call(ctx, "run_sql", query="SELECT region, sum(amount) AS total FROM sales GROUP BY region")
    second = call(ctx, "run_sql", query="SELECT * FROM products", as_name="products")
    third = call(ctx, "run_sql", query="SELECT 1 AS x;")
    assert (first.dataset, second.dataset, third.dataset) == ("q1", "products", "q2")
    expected = dict(query(db, "SELECT region, sum(amount) FROM sales GROUP BY region"))
    assert {r["region"]: r["total"] for r in ctx.datasets["q1"]} == expected
    assert len(ctx.datasets["products"]) == 20
    assert "Saved as 'q1': 5 rows; columns: region, total" in first.content


def test_run_sql_stops_at_the_row_limit_and_says_so(db):
    ctx = ToolContext(db_path=db, row_limit=50)
    result = call(ctx, "run_sql", query="SELECT * FROM orders", limit=1000)
    assert len(ctx.datasets["q1"]) == 50
    assert "cut at the 50-row limit" in result.content
    call(ctx, "run_sql", query="SELECT * FROM orders", limit=7)
    assert len(ctx.datasets["q2"]) == 7


@pytest.mark.parametrize("statement, says", [
    ("DELETE FROM orders", "only SELECT"),
    ("DROP TABLE orders", "only SELECT"),
    ("UPDATE orders SET amount = 0", "only SELECT"),
    ("INSERT INTO regions VALUES (9, 'Nowhere')", "only SELECT"),
    ("ATTACH DATABASE 'other.db' AS other", "only SELECT"),
    ("PRAGMA user_version = 7", "only SELECT"),
    ("SELECT 1; DELETE FROM orders", "exactly one SQL statement"),
    ("SELECT 1; SELECT 2", "exactly one SQL statement"),
    # these pass the keyword check: the authorizer is what stops them
    ("WITH x AS (SELECT 1) INSERT INTO regions SELECT 9, 'Nowhere' FROM x", "not allowed"),
    ("WITH x AS (SELECT 1) DELETE FROM orders", "not allowed"),
    ("SELECT load_extension('evil')", "not allowed"),
])
def test_run_sql_refuses_anything_but_one_select_and_leaves_the_file_alone(ctx, db, statement, says):
    before = digest(db)
    result = run_tool(RETRIEVAL_TOOLS, "run_sql", {"query": statement}, ctx)
    assert not result.ok
    assert result.content.startswith("error: ") and says in result.content
    assert digest(db) == before
    assert ctx.datasets == {}


def test_database_is_opened_read_only_even_without_the_authorizer(ctx, db):
    conn = sql._connect(ctx)
    try:
        with pytest.raises(sqlite3.OperationalError, match="readonly"):
            conn.execute("DELETE FROM orders")
    finally:
        conn.close()
    assert query(db, "SELECT count(*) FROM orders") == [(5000,)]


def test_runaway_query_is_stopped(ctx, monkeypatch):
    monkeypatch.setattr(sql, "WORK_LIMIT", 200_000)
    result = run_tool(RETRIEVAL_TOOLS, "run_sql", {"query": "SELECT count(*) FROM orders a, orders b"}, ctx)
    assert not result.ok and "too much work" in result.content


@pytest.mark.parametrize("statement", [
    "SELECT randomblob(999999999)",  # accepted before: 20 s and 2.9 GB
    "SELECT randomblob(3e8) FROM regions",  # 4.3 GB
    "SELECT randomblob(2000000)",
    "SELECT zeroblob(2000000) AS z",
    "SELECT group_concat(hex(randomblob(1000)), '') FROM orders",  # built up value by value
])
def test_sqlite_refuses_to_build_a_value_over_its_length_limit(ctx, statement):
    result = run_tool(RETRIEVAL_TOOLS, "run_sql", {"query": statement}, ctx)
    assert not result.ok and "larger than 1,000,000 bytes" in result.content and "leave that column out" in result.content
    assert ctx.datasets == {}


def test_a_result_wider_than_the_column_limit_is_refused_before_a_row_is_built(ctx):
    wide = ", ".join(["v"] * 150)
    result = run_tool(RETRIEVAL_TOOLS, "run_sql", {"query": f"WITH b(v) AS (SELECT zeroblob(999999)) SELECT {wide} FROM b"}, ctx)
    assert not result.ok and "returns 150 columns; select at most 100" in result.content
    call(ctx, "run_sql", query="WITH b(v) AS (SELECT 1) SELECT v, v AS w FROM b -- a trailing comment")
    assert ctx.datasets["q1"] == [{"v": 1, "w": 1}]


def test_a_stored_value_over_the_limit_is_refused_and_the_other_columns_still_read(tmp_path):
    path = tmp_path / "docs.db"
    with sqlite3.connect(path) as conn:
        conn.execute("CREATE TABLE docs (id INTEGER, body TEXT)")
        conn.execute("INSERT INTO docs VALUES (1, ?)", ("x" * 3_000_000,))
    ctx = ToolContext(db_path=path)
    for statement in ("SELECT body FROM docs", "SELECT substr(body, 1, 10) FROM docs"):
        result = run_tool(RETRIEVAL_TOOLS, "run_sql", {"query": statement}, ctx)
        assert not result.ok and "larger than 1,000,000 bytes" in result.content
    call(ctx, "run_sql", query="SELECT id FROM docs")
    assert ctx.datasets["q1"] == [{"id": 1}]


def test_long_cells_are_cut_with_a_note(ctx):
    result = call(ctx, "run_sql", query="SELECT hex(randomblob(5000)) AS h, randomblob(3000) AS b, 'short' AS s")
    [row] = ctx.datasets["q1"]
    assert row["h"].endswith(" [cut: cell was 10,000 characters; showing the first 2,000]")
    assert len(row["h"].split(" ")[0]) == bounds.CELL_CHARS
    assert row["b"].endswith(" [cut: cell was 3,000 bytes; showing the first 1,000]")
    assert len(row["b"].split(" ")[0]) == 2_000  # 1,000 bytes as hex
    assert row["s"] == "short"
    assert "2 cell(s) over 2,000 characters cut" in result.content


@pytest.mark.parametrize("source", ["orders", "orders a, orders b"])
def test_the_fetch_stops_at_the_result_byte_limit(ctx, source):
    # 5,000 (or 25 million) rows of a cut 10,000-character cell: the fetch stops at about 1 MB of kept cells,
    # long before the work limit, so the cross join returns as quickly as the single table.
    result = call(ctx, "run_sql", query=f"SELECT hex(randomblob(5000)) AS h FROM {source}")
    rows = ctx.datasets["q1"]
    size = sum(len(r["h"]) for r in rows)
    assert bounds.RESULT_BYTES < size <= bounds.RESULT_BYTES + len(rows[0]["h"])
    assert f"cut after {len(rows)} rows, at the 1,000,000-byte result limit" in result.content


# ---- processing ---------------------------------------------------------------------------------------------

@pytest.fixture
def sales(ctx) -> ToolContext:
    call(ctx, "run_sql", query="SELECT * FROM sales", as_name="sales")
    assert len(ctx.datasets["sales"]) == 5000
    return ctx


def test_aggregate_matches_sql_group_by(sales, db):
    metrics = [{"column": "amount", "fn": fn} for fn in ("sum", "avg", "min", "max")]
    metrics += [{"column": "quantity", "fn": "sum"}, {"column": "*", "fn": "count"}]
    result = call(sales, "aggregate", dataset="sales", group_by=["region"], metrics=metrics)
    got = {r["region"]: r for r in sales.datasets[result.dataset]}
    expected = query(db, "SELECT region, sum(amount), avg(amount), min(amount), max(amount), sum(quantity), "
                         "count(*) FROM sales GROUP BY region ORDER BY region")
    assert list(got) == [row[0] for row in expected]  # groups come out sorted
    for region, total, mean, low, high, units, n in expected:
        row = got[region]
        assert row["sum_amount"] == pytest.approx(total, abs=1e-6)
        assert row["avg_amount"] == pytest.approx(mean, abs=1e-6)
        assert (row["min_amount"], row["max_amount"]) == (low, high)
        assert (row["sum_quantity"], row["count"]) == (units, n)


def test_aggregate_without_group_by_gives_one_total(sales, db):
    result = call(sales, "aggregate", dataset="sales", metrics=[{"column": "amount", "fn": "sum"}])
    [(total,)] = query(db, "SELECT sum(amount) FROM orders")
    assert sales.datasets[result.dataset] == [{"sum_amount": pytest.approx(total, abs=1e-6)}]


@pytest.mark.parametrize("op, value, where", [
    ("=", "north", "region = 'North'"),
    ("!=", "North", "region != 'North'"),
    (">", 1000, "amount > 1000"),
    (">=", "1000", "amount >= 1000"),
    ("<", 10, "quantity < 10"),
    ("<=", "2025-03-31", "order_date <= '2025-03-31'"),
    ("contains", "chair", "product LIKE '%chair%'"),
])
def test_filter_rows_matches_sql_where(sales, db, op, value, where):
    column = where.split()[0]
    result = call(sales, "filter_rows", dataset="sales", column=column, op=op, value=value)
    expected = [row[0] for row in query(db, f"SELECT order_id FROM sales WHERE {where} ORDER BY order_id")]
    assert sorted(r["order_id"] for r in sales.datasets[result.dataset]) == expected
    assert 0 < len(expected) < 5000


def test_sort_and_top_k_match_sql_order_by(sales, db):
    expected = [row[0] for row in query(db, "SELECT amount FROM sales ORDER BY amount DESC LIMIT 10")]
    top = call(sales, "top_k", dataset="sales", by="amount", k=10)
    assert [r["amount"] for r in sales.datasets[top.dataset]] == expected
    ascending = call(sales, "sort_rows", dataset="sales", by="order_date")
    dates = [r["order_date"] for r in sales.datasets[ascending.dataset]]
    assert dates == sorted(dates) and dates[0] == "2025-01-01"
    descending = call(sales, "sort_rows", dataset="sales", by="amount", descending=True, as_name="big")
    assert descending.dataset == "big"
    assert [r["amount"] for r in sales.datasets["big"][:10]] == expected


def test_sort_puts_missing_values_last_in_both_directions(ctx):
    ctx.datasets["d"] = [{"x": 2}, {"x": None}, {"x": 1}, {"x": 3}]
    for descending, order in ((False, [1, 2, 3, None]), (True, [3, 2, 1, None])):
        result = call(ctx, "sort_rows", dataset="d", by="x", descending=descending)
        assert [r["x"] for r in ctx.datasets[result.dataset]] == order


def test_derive_column_computes_per_row(sales):
    result = call(sales, "derive_column", dataset="sales", name="each", expression="amount / quantity")
    rows = sales.datasets[result.dataset]
    assert all(abs(r["each"] - r["unit_price"]) < 0.01 for r in rows)
    assert "each" not in sales.datasets["sales"][0]  # the source dataset is not changed
    sales.datasets["d"] = [{"a": 4, "b": 0}, {"a": None, "b": 2}, {"a": 6, "b": 3}]
    result = call(sales, "derive_column", dataset="d", name="c", expression="-(a + 2) * 3 / b + 1.5")
    assert [r["c"] for r in sales.datasets[result.dataset]] == [None, None, -6.5]


@pytest.mark.parametrize("expression, says", [
    ("__import__('os').system('touch /tmp/pwned')", "not allowed"),
    ("amount.real", "not allowed"),
    ("amount ** 2", "not allowed"),
    ("[amount]", "not allowed"),
    ("(lambda: 1)()", "not allowed"),
    ("amount if quantity else 0", "not allowed"),
    ("'text'", "not allowed"),
    ("amount +", "not an arithmetic expression"),
    ("price * 2", "no column 'price'"),
    ("amount" + " + 1" * 100, "longer than"),
])
def test_derive_column_rejects_anything_but_arithmetic(ctx, expression, says):
    ctx.datasets["d"] = [{"amount": 10.0, "quantity": 2}]
    result = run_tool(PROCESSING_TOOLS, "derive_column", {"dataset": "d", "name": "x", "expression": expression}, ctx)
    assert not result.ok and says in result.content, result.content
    assert list(ctx.datasets) == ["d"]


@pytest.mark.parametrize("expression", ["1e308*1e308-1e308*1e308", "amount * 1e308 * 1e308", "1e999", "-1e999 + amount"])
def test_derive_column_refuses_a_result_that_is_not_finite(ctx, expression):
    ctx.datasets["d"] = [{"amount": 10.0, "quantity": 2}]
    result = run_tool(PROCESSING_TOOLS, "derive_column", {"dataset": "d", "name": "x", "expression": expression}, ctx)
    assert not result.ok and "not a finite number" in result.content and "scale the columns down" in result.content
    assert list(ctx.datasets) == ["d"]  # nothing stored, NaN or otherwise


def test_aggregate_refuses_a_sum_that_overflows(ctx):
    ctx.datasets["d"] = [{"a": 1e308}, {"a": 1e308}, {"a": 0.5}]
    for fn in ("sum", "avg"):
        result = run_tool(PROCESSING_TOOLS, "aggregate", {"dataset": "d", "metrics": [{"column": "a", "fn": fn}]}, ctx)
        assert not result.ok and f"the {fn} of 'a' is not a finite number" in result.content
    assert list(ctx.datasets) == ["d"]


# ---- validation ---------------------------------------------------------------------------------------------

def test_validate_json_schema_passes_and_fails_with_specifics(ctx):
    schema = json.dumps({"type": "object", "required": ["region", "total"],
                         "properties": {"region": {"type": "string"}, "total": {"type": "number", "minimum": 0}}})
    passed = call(ctx, "validate_json_schema", value_json='{"region": "North", "total": 5.5}', schema_json=schema)
    assert passed.content.startswith("PASS")
    failed = call(ctx, "validate_json_schema", value_json='{"total": -1}', schema_json=schema)
    assert failed.content.startswith("FAIL: 2 problem(s)")
    assert "'region' is a required property" in failed.content and "$.total" in failed.content


def test_check_range_and_not_empty(ctx):
    ctx.datasets["d"] = [{"v": 1}, {"v": 5}, {"v": None}, {"v": 12.5}]
    ctx.datasets["empty"] = []
    assert call(ctx, "check_range", dataset="d", column="v", min=0, max=20).content.startswith("FAIL: 1 of 4")
    failed = call(ctx, "check_range", dataset="d", column="v", max=4).content
    assert failed.startswith("FAIL: 3 of 4") and "row 1: 5" in failed and "row 2: empty" in failed
    ctx.datasets["d"].pop(2)
    assert call(ctx, "check_range", dataset="d", column="v", min=1).content.startswith("PASS: all 3 values")
    assert call(ctx, "check_not_empty", dataset="d").content == "PASS: 'd' has 3 rows"
    assert call(ctx, "check_not_empty", dataset="empty").content.startswith("FAIL: 'empty' has no rows")


# ---- formatting ---------------------------------------------------------------------------------------------

ROWS = [{"region": "North", "total": 1234.5, "n": 3}, {"region": "So|uth", "total": 10.0, "n": None}]


def test_markdown_table(ctx):
    ctx.datasets["d"] = ROWS
    assert call(ctx, "markdown_table", dataset="d").artifact == (
        "| region | total | n |\n|---|---|---|\n| North | 1234.50 | 3 |\n| So\\|uth | 10 |  |")
    short = call(ctx, "markdown_table", dataset="d", columns=["n"], max_rows=1).artifact
    assert short == "| n |\n|---|\n| 3 |\n\n(1 more row not shown)"


def test_csv_and_json_round_trip(ctx):
    ctx.datasets["d"] = ROWS
    text = call(ctx, "to_csv", dataset="d").artifact
    assert list(csv.DictReader(io.StringIO(text))) == [
        {"region": "North", "total": "1234.5", "n": "3"}, {"region": "So|uth", "total": "10.0", "n": ""}]
    assert json.loads(call(ctx, "to_json", dataset="d").artifact) == ROWS


def test_report(ctx):
    ctx.datasets["d"] = ROWS
    sections = [{"heading": "Summary", "body": "North leads."}, {"heading": "Notes", "body": "Two regions."}]
    text = call(ctx, "report", title="Sales 2025", sections=sections, dataset="d").artifact
    assert text.startswith("# Sales 2025\n\n## Summary\n\nNorth leads.\n\n## Notes\n\nTwo regions.\n\n| region |")


def test_long_output_is_cut_for_the_model_but_kept_whole_in_the_artifact(sales):
    result = call(sales, "to_csv", dataset="sales")
    assert result.artifact.count("\n") == 5001
    assert len(result.content) <= base.MAX_CONTENT_CHARS + 80
    assert result.content.endswith(f" [cut: tool result was {len(result.artifact):,} characters; showing the first 1,500]")


def test_a_long_cell_is_cut_in_a_markdown_table(ctx):
    ctx.datasets["d"] = [{"note": "y" * 5000, "n": 1}]
    table = call(ctx, "markdown_table", dataset="d").artifact
    assert "| " + "y" * 200 + " [cut: cell was 5,000 characters; showing the first 200] | 1 |" in table


# ---- bad calls ----------------------------------------------------------------------------------------------

@pytest.mark.parametrize("name, arguments, says", [
    ("drop_everything", {}, "unknown tool 'drop_everything'. Call one of: list_tables"),
    ("run_sql", '{"query": "SELECT 1"', "not valid JSON"),
    ("run_sql", '["SELECT 1"]', "must be a JSON object"),
    ("run_sql", {}, "'query' is required. Call it as run_sql(query: string, limit?: integer"),
    ("run_sql", {"query": "SELECT 1", "table": "x"}, "'table' is not an argument"),
    ("run_sql", {"query": "SELECT 1", "limit": "many"}, "'limit': Input should be a valid integer"),
    ("run_sql", {"query": "SELECT nope FROM orders"}, "no such column: nope. Call describe_table"),
    ("run_sql", {"query": "SELECT * FROM nope"}, "no such table: nope. Call list_tables"),
    ("describe_table", {"table": "nope"}, "no table 'nope'. Tables: customers, orders"),
    ("filter_rows", {"dataset": "q9", "column": "a", "op": "=", "value": 1}, "no dataset named 'q9'. Datasets: d"),
    ("filter_rows", {"dataset": "d", "column": "zz", "op": "=", "value": 1}, "no column 'zz' in dataset 'd'"),
    ("filter_rows", {"dataset": "d", "column": "a", "op": "like", "value": 1}, "'op': Input should be '='"),
    ("aggregate", {"dataset": "d", "metrics": [{"column": "a", "fn": "median"}]}, "'metrics.0.fn'"),
    ("aggregate", {"dataset": "d", "metrics": []}, "'metrics'"),
    ("aggregate", {"dataset": "d", "metrics": [{"column": "b", "fn": "sum"}]}, "'b' holds text"),
    ("aggregate", {"dataset": "d", "metrics": [{"column": "*", "fn": "avg"}]}, "only works with count"),
    ("top_k", {"dataset": "d", "by": "a", "k": 0}, "'k': Input should be greater than or equal to 1"),
    ("check_range", {"dataset": "d", "column": "a"}, "give min, max or both"),
    ("validate_json_schema", {"value_json": "{oops", "schema_json": "{}"}, "value_json is not valid JSON"),
    ("validate_json_schema", {"value_json": "1", "schema_json": '{"type": "bogus"}'}, "not a valid JSON schema"),
    ("markdown_table", {"dataset": "d", "columns": ["a", "zz"]}, "no column 'zz'"),
    ("report", {"title": " "}, "title must not be empty"),
])
def test_bad_calls_come_back_as_errors_that_say_what_to_do(ctx, name, arguments, says):
    ctx.datasets["d"] = [{"a": 1, "b": "x"}]
    result = run_tool(ALL_TOOLS, name, arguments, ctx)
    assert not result.ok
    assert result.content.startswith("error: ") and says in result.content, result.content


def test_missing_database_is_reported_not_raised(tmp_path):
    ctx = ToolContext(db_path=tmp_path / "absent.db")
    result = run_tool(RETRIEVAL_TOOLS, "list_tables", "", ctx)
    assert not result.ok and "ensure_sales_db" in result.content
    assert not (tmp_path / "absent.db").exists()


# ---- schemas ------------------------------------------------------------------------------------------------

def walk(schema: dict):
    """Every sub-schema (property names are data, so `properties` is stepped through, not yielded)."""
    yield schema
    for sub in schema.get("properties", {}).values():
        yield from walk(sub)
    for sub in [schema["items"]] if "items" in schema else []:
        yield from walk(sub)
    for sub in schema.get("anyOf", []):
        yield from walk(sub)


@pytest.mark.parametrize("spec", ALL_TOOLS, ids=lambda t: t.name)
def test_openai_schema_is_clean_valid_json_schema(spec):
    schema = spec.openai_schema()
    assert schema["type"] == "function" and schema["function"]["name"] == spec.name
    assert schema["function"]["description"]
    params = schema["function"]["parameters"]
    Draft202012Validator.check_schema(params)
    assert params["type"] == "object" and params["additionalProperties"] is False
    for node in walk(params):
        assert not {"title", "$ref", "$defs"} & node.keys()
        assert node.get("type") != "null"
    required = {name for name, f in spec.args.model_fields.items() if f.is_required()}
    assert set(params.get("required", [])) == {spec.args.model_fields[n].alias or n for n in required}


def test_tool_names_are_unique_and_agents_get_their_lists():
    names = [t.name for t in ALL_TOOLS]
    assert len(names) == len(set(names)) == 15
    assert TOOLS_BY_AGENT == {"retrieval": RETRIEVAL_TOOLS, "processing": PROCESSING_TOOLS,
                              "validation": VALIDATION_TOOLS, "formatting": FORMATTING_TOOLS}
    enums = {t.name: t.parameters() for t in PROCESSING_TOOLS}
    assert enums["filter_rows"]["properties"]["op"]["enum"] == ["=", "!=", ">", ">=", "<", "<=", "contains"]
    assert enums["aggregate"]["properties"]["metrics"]["items"]["properties"]["fn"]["enum"] == [
        "sum", "avg", "min", "max", "count"]


def test_a_bare_name_finds_the_dataset_an_earlier_step_saved_under_its_task_id(tmp_path):
    from agents.tools import ToolContext, run_tool, PROCESSING_TOOLS

    ctx = ToolContext(db_path=tmp_path / "none.db", datasets={
        "s0.0.retrieval.by_region": [{"region": "North", "total": 5}, {"region": "South", "total": 9}],
        "s0.1.retrieval.other": [], "s0.2.retrieval.other": []})
    result = run_tool(PROCESSING_TOOLS, "top_k", {"dataset": "by_region", "by": "total", "k": 1}, ctx)
    assert result.ok and ctx.datasets[result.dataset] == [{"region": "South", "total": 9}]
    ambiguous = run_tool(PROCESSING_TOOLS, "top_k", {"dataset": "other", "by": "x", "k": 1}, ctx)
    assert not ambiguous.ok and "s0.1.retrieval.other" in ambiguous.content
