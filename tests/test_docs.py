"""The documentation pinned to the code: what the docs claim is read from the tree and the
constants, so a drift fails here instead of misleading a reader.

- README.md's asset tables name exactly the assets of ``pipelines.definitions.defs``;
- docs/ARCHITECTURE.md's layout section names exactly the modules and packages of carmodels/;
- its schema tables match the schema constants of the code;
- docs/benchmarks/README.md's generated table is what ``bench/bench_index.py`` would write;
- every relative link of the docs leads to a file (and heading) that exists.

Read-only: nothing here writes into the tree.
"""

from __future__ import annotations

import importlib
import importlib.util
import re
import sys
from pathlib import Path
from types import ModuleType

import pytest

REPO = Path(__file__).resolve().parents[1]
README = REPO / "README.md"
ARCHITECTURE = REPO / "docs" / "ARCHITECTURE.md"
PACKAGE = REPO / "carmodels"

_CODE_SPAN = re.compile(r"`([^`\n]+)`")


# --------------------------------------------------------------------------- markdown helpers


def section(text: str, heading: str) -> str:
    """The body under the first heading whose title starts with ``heading``, up to the next
    heading of the same or a higher level."""
    lines = text.splitlines()
    for i, line in enumerate(lines):
        match = re.match(r"^(#+)\s+(.*)$", line)
        if match and match.group(2).startswith(heading):
            level = len(match.group(1))
            body = []
            for rest in lines[i + 1 :]:
                deeper = re.match(r"^(#+)\s", rest)
                if deeper and len(deeper.group(1)) <= level:
                    break
                body.append(rest)
            return "\n".join(body)
    raise AssertionError(f"no heading starting {heading!r}")


def tables(text: str) -> list[list[list[str]]]:
    """Every Markdown table in ``text``: a list of rows (header first, rule left out), each a
    list of stripped cells."""
    found: list[list[list[str]]] = []
    current: list[list[str]] = []
    for line in [*text.splitlines(), ""]:
        if line.lstrip().startswith("|"):
            cells = [c.strip() for c in line.strip().strip("|").split("|")]
            if not all(re.fullmatch(r":?-+:?", c) for c in cells):
                current.append(cells)
        elif current:
            found.append(current)
            current = []
    return found


def code(cell: str) -> str:
    """The first code span of a table cell (``name`` of ``| `name` | ... |``)."""
    match = _CODE_SPAN.search(cell)
    assert match, f"no code span in table cell {cell!r}"
    return match.group(1)


def schema_rows(heading: str) -> list[list[str]]:
    """The rows (no header) of the one table under an ARCHITECTURE.md schema heading."""
    found = tables(section(ARCHITECTURE.read_text(), heading))
    assert found, f"no table under {heading!r} in {ARCHITECTURE}"
    return found[0][1:]


def load_script(path: Path, monkeypatch: pytest.MonkeyPatch) -> ModuleType:
    """Import a script by path without leaving a bytecode cache in the tree."""
    monkeypatch.setattr(sys, "dont_write_bytecode", True)
    spec = importlib.util.spec_from_file_location(f"_docs_{path.stem}", path)
    module = importlib.util.module_from_spec(spec)
    monkeypatch.setitem(sys.modules, spec.name, module)
    spec.loader.exec_module(module)
    return module


def constant(name: str, *modules: str):
    """``name`` from the first of ``modules`` that defines it (the code is being moved
    between modules; the doc pins the value, not where it lives)."""
    for module_name in modules:
        try:
            module = importlib.import_module(module_name)
        except ImportError:
            continue
        if hasattr(module, name):
            return getattr(module, name)
    raise AssertionError(f"none of {modules} defines {name}; update tests/test_docs.py")


# --------------------------------------------------------------------------- README assets


def test_readme_asset_tables_name_exactly_the_defined_assets():
    from pipelines.definitions import defs

    defined = {key.to_user_string() for key in defs.resolve_all_asset_keys()}
    asset_tables = [t for t in tables(README.read_text()) if t[0][0] == "asset"]
    assert [len(t) - 1 for t in asset_tables] == [6, 3], (
        "README.md should have the table of the six pipeline assets and the one of the three "
        "that use the trained generator"
    )
    documented = [code(row[0]) for t in asset_tables for row in t[1:]]
    assert len(documented) == len(set(documented)), f"an asset is listed twice: {documented}"
    assert set(documented) == defined, (
        f"README.md's asset tables list {sorted(set(documented) - defined)} that defs lacks "
        f"and lack {sorted(defined - set(documented))}"
    )


# --------------------------------------------------------------------------- module layout


def tree_modules() -> set[str]:
    """Every module and package under carmodels/, as ``scrape/raw.py`` and ``scrape/``."""
    names = set()
    for path in PACKAGE.rglob("*.py"):
        relative = path.relative_to(PACKAGE)
        if "__pycache__" in relative.parts:
            continue
        if path.name == "__init__.py":
            if relative.parent != Path("."):
                names.add(relative.parent.as_posix() + "/")
        else:
            names.add(relative.as_posix())
    return names


def layout_names() -> set[str]:
    body = section(ARCHITECTURE.read_text(), "Layout of `carmodels/`")
    return {
        span for span in _CODE_SPAN.findall(body) if span.endswith((".py", "/")) and " " not in span
    }


def test_every_carmodels_module_is_in_the_architecture_layout():
    missing = sorted(tree_modules() - layout_names())
    assert not missing, (
        f"modules of carmodels/ not named in docs/ARCHITECTURE.md's layout section: {missing}"
    )


def test_architecture_layout_names_only_modules_that_exist():
    stale = sorted(layout_names() - tree_modules())
    assert not stale, (
        f"docs/ARCHITECTURE.md's layout section names modules carmodels/ does not have: {stale}"
    )


# --------------------------------------------------------------------------- schemas


def test_raw_shard_table_matches_raw_fields():
    raw = importlib.import_module("carmodels.scrape.raw")
    rows = schema_rows("Raw shards")
    documented = [(code(r[0]), code(r[1]), r[2] == "yes") for r in rows]
    expected = [(f.name, str(f.type), f.nullable) for f in raw.RAW_FIELDS]
    assert documented == expected
    assert f"`{raw.THUMBNAIL_FIELD.name}` (`{raw.THUMBNAIL_FIELD.type}`" in section(
        ARCHITECTURE.read_text(), "Raw shards"
    )


def test_unique_table_starts_with_the_core_columns():
    core = constant("UNIQUE_CORE_COLUMNS", "carmodels.dedup.schema", "carmodels.dedup")
    documented = [code(r[0]) for r in schema_rows("Unique index")]
    assert documented[: len(core)] == list(core)


def _shard_fields() -> list[tuple[str, str]]:
    shards = importlib.import_module("carmodels.shards")
    schema = getattr(shards, "SHARD_SCHEMA", None) or shards._shard_schema([])
    return [(f.name, str(f.type)) for f in schema]


def test_car_shard_table_matches_the_shard_schema():
    documented = [(code(r[0]), code(r[1])) for r in schema_rows("Car shards")]
    assert documented == _shard_fields()


def test_shard_summary_version_is_the_documented_one():
    version = constant("SHARD_SCHEMA_VERSION", "carmodels.shards")
    assert f"(`SHARD_SCHEMA_VERSION` = {version};" in section(
        ARCHITECTURE.read_text(), "Car shards"
    )


def test_checkpoint_table_matches_the_checkpoint_keys():
    keys = constant("CHECKPOINT_KEYS", "carmodels.checkpoint", "carmodels.train")
    version = constant("CHECKPOINT_FORMAT", "carmodels.checkpoint", "carmodels.train")
    rows = schema_rows("Checkpoints")
    always = {code(r[0]) for r in rows if r[1] == "always"}
    assert always == {"format", *keys}
    format_row = next(r for r in rows if code(r[0]) == "format")
    assert f"`CHECKPOINT_FORMAT` = {version}" in format_row[2]


def test_storage_layout_names_every_stage_folder():
    layout = importlib.import_module("carmodels.layout")
    folders = [v for k, v in vars(layout).items() if k.endswith("_DIR") and isinstance(v, str)]
    assert folders, "carmodels.layout defines no *_DIR folder constants"
    body = section(ARCHITECTURE.read_text(), "Storage layout")
    missing = [f for f in folders if f"`{f}/`" not in body]
    assert not missing, f"stage folders missing from the storage layout table: {missing}"


def test_storage_layout_names_the_dedup_files():
    body = section(ARCHITECTURE.read_text(), "Storage layout")
    for name in ("UNIQUE_FILE", "CLUSTERS_FILE", "HASHES_FILE", "CONTACT_SHEET_FILE"):
        value = constant(name, "carmodels.dedup.schema", "carmodels.dedup")
        assert f"`{value}`" in body, f"{name} ({value}) is not in the storage layout table"


# --------------------------------------------------------------------------- benchmarks


@pytest.fixture
def bench_index(monkeypatch: pytest.MonkeyPatch) -> ModuleType:
    return load_script(REPO / "bench" / "bench_index.py", monkeypatch)


def test_benchmark_index_is_up_to_date(bench_index: ModuleType):
    stale = bench_index.check()
    assert not stale, (
        f"{[str(p.relative_to(REPO)) for p in stale]} differ from what bench/bench_index.py "
        "writes: run `python bench/bench_index.py`"
    )


def test_benchmark_index_commands_use_real_options(bench_index: ModuleType):
    for benchmark, runs in bench_index.rows():
        command = bench_index.command(benchmark, runs[-1])
        source = (REPO / benchmark.script).read_text()
        if "from _common import" in source:  # options shared by several scripts live there
            source += (REPO / "bench" / "_common.py").read_text()
        for flag in re.findall(r"(--[a-z0-9-]+)", command):
            assert f'"{flag}"' in source, f"{benchmark.script} has no option {flag}: {command}"


def test_benchmark_index_rejects_an_unknown_result_file(bench_index: ModuleType, tmp_path: Path):
    (tmp_path / "2026-12-31-mystery.json").write_text('{"date": "2026-12-31"}')
    with pytest.raises(bench_index.BenchIndexError, match="mystery"):
        bench_index.rows(tmp_path)


def test_benchmark_index_takes_the_latest_headline_run(bench_index: ModuleType):
    current = {b.key: [r.path.name for r in runs] for b, runs in bench_index.rows()}
    # Side measurements of the same day (one thread, --flip, 10^7 hashes) are not current.
    assert current["dedup-scale"] == [
        f"2026-12-01-dedup-scale-threads-run{k}.json" for k in (1, 2, 3)
    ]
    assert current["facing"] == ["2026-11-28-facing-audited.json"]


# --------------------------------------------------------------------------- links


def _slug(heading: str) -> str:
    """GitHub's anchor for a heading."""
    text = _CODE_SPAN.sub(r"\1", heading).strip().lower()
    text = re.sub(r"[^\w\- ]", "", text)
    return text.replace(" ", "-")


def _anchors(path: Path) -> set[str]:
    text = path.read_text()
    found = {_slug(m) for m in re.findall(r"^#+\s+(.*)$", text, flags=re.M)}
    return found | set(re.findall(r'<a id="([^"]+)"', text))


def _doc_files() -> list[Path]:
    return [README, *sorted((REPO / "docs").rglob("*.md"))]


@pytest.mark.parametrize("doc", _doc_files(), ids=lambda p: str(p.relative_to(REPO)))
def test_relative_links_resolve(doc: Path):
    text = re.sub(r"```.*?```", "", doc.read_text(), flags=re.S)
    text = _CODE_SPAN.sub("code", text)
    broken = []
    for target in re.findall(r"\]\(([^)\s]+)\)", text):
        if re.match(r"^[a-z]+:", target):
            continue  # http(s):, mailto:
        file_part, _, anchor = target.partition("#")
        path = (doc.parent / file_part).resolve() if file_part else doc
        missing_anchor = bool(anchor) and path.suffix == ".md" and anchor not in _anchors(path)
        if not path.exists() or missing_anchor:
            broken.append(target)
    assert not broken, f"{doc.relative_to(REPO)} links to what does not exist: {broken}"
