"""Documentation that cannot rot: the params reference, relative links and anchors, the README's results, and the
citation files."""
from __future__ import annotations

import json
import re
import tomllib
import urllib.parse
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

import pytest
import yaml

from pipeline.core import params_reference
from pipeline.core.config import ParamsError, _check_range
from pipeline.reporting.compare import Stat

REPO = Path(__file__).resolve().parents[1]
PYPROJECT = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]
DOCS = [REPO / "README.md", REPO / "CHANGELOG.md", *sorted((REPO / "docs").rglob("*.md"))]


# -- the params reference -------------------------------------------------------------------------


def flat_keys(tree: dict, prefix: str = "") -> set[str]:
    """Dotted keys of a nested mapping; a list (also a list of rows) is one key."""
    keys = set()
    for key, value in tree.items():
        dotted = f"{prefix}{key}"
        keys |= flat_keys(value, f"{dotted}.") if isinstance(value, dict) else {dotted}
    return keys


def test_params_page_is_the_rendered_schema():
    committed = (REPO / "docs" / "params.md").read_text()
    assert committed == params_reference.render(), (
        "docs/params.md differs from the schema in pipeline/core/config.py: run python -m pipeline.core.params_reference"
    )


def test_reference_covers_exactly_the_keys_of_params_yaml():
    shipped = flat_keys(yaml.safe_load((REPO / "params.yaml").read_text()))
    documented = params_reference.keys()
    assert shipped == documented, (
        f"in params.yaml only: {sorted(shipped - documented)}; in the reference only: {sorted(documented - shipped)}"
    )


def test_every_non_range_check_states_its_rule():
    assert params_reference.missing_rules() == [], "add a '# rule: ...' comment above these fields in config.py"


def test_params_yaml_header_points_to_the_reference():
    header = (REPO / "params.yaml").read_text().splitlines()[0]
    assert header.startswith("#") and "docs/params.md" in header


# A toy schema: what each part of the reference is read from (types, Literal, ranges, rules, bindings).
@dataclass(frozen=True)
class ToyRow:
    """A row."""

    name: str  # names the row


@dataclass(frozen=True)
class ToyInner:
    """The inner section."""

    size: int = 3  # how big
    weights: tuple[float, ...] = (1.0,)  # one per size

    def validate(self, limit: int, prefix: str) -> None:
        _check_range(f"{prefix}.size", self.size, 1, limit)
        for i, w in enumerate(self.weights):
            _check_range(f"{prefix}.weights[{i}]", w, 0.0, None, low_open=True)


@dataclass(frozen=True)
class ToySchema:
    """The toy root."""

    rate: float = 0.5  # how fast
    mode: Literal["a", "b"] = "a"  # which way
    # rule: even
    count: int = 2  # how many
    extra: int | None = None  # checked without a rule
    rows: tuple[ToyRow, ...] = (ToyRow("x"),)  # the rows
    inner: ToyInner = field(default_factory=ToyInner)

    def validate(self) -> None:
        _check_range("rate", self.rate, 0.0, 1.0, low_open=True)
        if self.count % 2:
            raise ParamsError("count", "must be even")
        for key in ("extra",):
            if getattr(self, key) is not None and getattr(self, key) > 9:
                raise ParamsError(key, "too big")
        for i, row in enumerate(self.rows):
            key = f"rows[{i}]"
            if not row.name:
                raise ParamsError(f"{key}.name", "empty")  # a row's field checked by its parent, without a rule
        self.inner.validate(self.count, "inner")


def test_reference_reads_types_ranges_rules_and_bindings_from_the_code():
    rows = {e.key: e for s in params_reference.sections(ToySchema) for e in s.entries}
    assert rows["rate"].allowed == "(0.0, 1.0]" and rows["rate"].meaning == "how fast"
    assert rows["mode"].allowed == "one of `a`, `b`" and rows["mode"].default == "`a`"
    assert rows["count"].allowed == "even" and not rows["count"].rule_missing
    assert rows["extra"].type == "int or null" and rows["extra"].allowed == "see validation"
    assert rows["inner.size"].allowed == "[1, `count`]"  # the caller's argument, not the parameter's name
    assert rows["inner.weights"].allowed == "each > 0.0" and rows["inner.weights"].type == "list of float"
    assert rows["rows"].type == "list of {name}" and rows["rows"].default == "1 rows: `x`"
    assert rows["rows[].name"].default == "required"
    assert rows["rows[].name"].allowed == "see validation"
    assert params_reference.missing_rules(ToySchema) == ["extra", "rows[].name"]
    assert params_reference.keys(ToySchema) == {"rate", "mode", "count", "extra", "rows", "inner.size", "inner.weights"}


@dataclass(frozen=True)
class ToyUndocumented:
    """A field without a meaning."""

    silent: int = 0


def test_a_field_without_a_comment_is_an_error():
    with pytest.raises(ValueError, match="silent"):
        params_reference.sections(ToyUndocumented)


# -- links and anchors ---------------------------------------------------------------------------

FENCE = re.compile(r"^ {0,3}(`{3,}|~{3,})")
CODE_SPAN = re.compile(r"(`+)(?:(?!\n[ \t]*\n).)*?\1", re.S)  # never across a blank line (a paragraph end)
INLINE_LINK = re.compile(
    r"!?\[((?:[^\[\]]|\[[^\[\]]*\])*)\]"  # text, one level of nested brackets
    r"\(\s*(<[^>\n]*>|[^\s()]*(?:\([^\s()]*\)[^\s()]*)*)"  # destination, balanced parentheses
    r"(?:\s+(?:\"[^\"]*\"|'[^']*'|\([^)]*\)))?\s*\)"  # optional title
)
REFERENCE_DEFINITION = re.compile(r"^ {0,3}\[([^\]]+)\]:\s*(<[^>\n]*>|\S+)", re.M)
HTML_ANCHOR = re.compile(r"<a\s[^>]*\b(?:id|name)\s*=\s*[\"']([^\"']+)[\"']", re.I)
SKIPPED_SCHEMES = re.compile(r"^(https?|mailto):", re.I)


def blank_fences(markdown: str) -> str:
    """The text with fenced code blocks blanked (line numbers kept)."""
    out, fence = [], None
    for line in markdown.split("\n"):
        match = FENCE.match(line)
        if fence is None and match:
            fence = match.group(1)
            out.append("")
        elif fence is not None:
            if match and match.group(1)[0] == fence[0] and len(match.group(1)) >= len(fence) and not line.strip(" `~"):
                fence = None
            out.append("")
        else:
            out.append(line)
    return "\n".join(out)


def blank_code(markdown: str) -> str:
    """The text with fenced blocks and code spans replaced by blanks (line numbers and offsets kept)."""
    return CODE_SPAN.sub(lambda m: re.sub(r"[^\n]", " ", m.group(0)), blank_fences(markdown))


def heading_text(raw: str) -> str:
    """A heading's rendered text: code spans keep their content, links their text, markup goes."""
    text = re.sub(r"!?\[([^\]]*)\]\([^)]*\)", r"\1", raw)
    text = re.sub(r"<[^>]+>", "", text)
    parts = re.split(r"(`+)(.*?)\1", text)
    # re.split yields [prose, fence, code, prose, ...]: emphasis markers only count outside code
    plain = [re.sub(r"(?<!\w)_+|_+(?!\w)|[*~]", "", p) if i % 3 == 0 else p for i, p in enumerate(parts) if i % 3 != 1]
    return "".join(plain).strip()


def github_anchor(heading: str, seen: dict[str, int] | None = None) -> str:
    """GitHub's anchor of a heading: lower case, punctuation but - and _ dropped, spaces -> -; repeats get -1, -2."""
    slug = re.sub(r"[^\w\- ]", "", heading_text(heading).lower()).replace(" ", "-")
    if seen is None:
        return slug
    unique, n = slug, seen.get(slug, 0)
    while unique in seen:
        n += 1
        unique = f"{slug}-{n}"
    seen[slug] = n
    seen[unique] = 0
    return unique


def anchors(markdown: str) -> set[str]:
    """Every anchor a Markdown file defines: its headings (ATX and setext) and HTML id/name attributes."""
    seen: dict[str, int] = {}
    found = set()
    lines = blank_fences(markdown).split("\n")  # code spans stay: `x` in a heading is part of its anchor
    for i, line in enumerate(lines):
        atx = re.match(r"^ {0,3}#{1,6}(?:[ \t]+(.*?))?(?:[ \t]+#+)?[ \t]*$", line)
        setext = (i > 0 and re.match(r"^ {0,3}(=+|-+)[ \t]*$", line) and lines[i - 1].strip()
                  and not re.match(r"^ {0,3}([#>|*+-]|\d+[.)])", lines[i - 1]))
        if atx:
            found.add(github_anchor(atx.group(1) or "", seen))
        elif setext:
            found.add(github_anchor(lines[i - 1].strip(), seen))
    found.update(HTML_ANCHOR.findall(markdown))
    return found


def links(markdown: str) -> list[tuple[int, str]]:
    """``(line, destination)`` of every inline link, image and reference definition outside code."""
    text = blank_code(markdown)
    found = [(m.start(2), m.group(2)) for m in INLINE_LINK.finditer(text)]
    found += [(m.start(2), m.group(2)) for m in REFERENCE_DEFINITION.finditer(text)]
    return [(text.count("\n", 0, start) + 1, dest.strip("<>")) for start, dest in sorted(found)]


def broken_links(doc: Path, root: Path = REPO) -> list[str]:
    """``file:line: destination (why)`` for each relative link of ``doc`` that does not resolve."""
    problems = []
    for line, dest in links(doc.read_text()):
        if SKIPPED_SCHEMES.match(dest):
            continue
        path_part, _, anchor = dest.partition("#")
        path_part = urllib.parse.unquote(path_part.split("?")[0])
        anchor = urllib.parse.unquote(anchor)
        if not path_part:
            target = doc
        else:
            target = (root / path_part.lstrip("/")) if path_part.startswith("/") else (doc.parent / path_part)
        target = target.resolve()
        where = f"{doc.relative_to(root)}:{line}: {dest}"
        if not dest:
            problems.append(f"{where} (empty link)")
        elif not target.is_relative_to(root.resolve()):
            problems.append(f"{where} (outside the repository)")
        elif not target.exists():
            problems.append(f"{where} (no such file)")
        elif anchor and target.suffix == ".md" and target.is_file():
            if anchor not in anchors(target.read_text()):
                problems.append(f"{where} (no heading with anchor #{anchor} in {target.relative_to(root.resolve())})")
        elif anchor:
            lines = re.fullmatch(r"L(\d+)(?:-L(\d+))?", anchor)  # GitHub's line anchors into a source file
            if not (lines and target.is_file()
                    and max(int(n) for n in lines.groups() if n) <= len(target.read_text().splitlines())):
                problems.append(f"{where} (anchor #{anchor} does not resolve in a non-Markdown file)")
    return problems


@pytest.mark.parametrize("doc", DOCS, ids=lambda p: p.relative_to(REPO).as_posix())
def test_relative_links_and_anchors_resolve(doc):
    problems = broken_links(doc)
    assert not problems, "broken links:\n" + "\n".join(problems)


@pytest.mark.parametrize("heading, anchor", [
    ("Bit for bit across CPUs", "bit-for-bit-across-cpus"),
    ("Performance options (`pretrain` in params.yaml)", "performance-options-pretrain-in-paramsyaml"),
    ("`data.synthetic`", "datasynthetic"),
    ("`linear_sgd`", "linear_sgd"),
    ("Step 2: 3.5 x faster, 100% (really!)", "step-2-35-x-faster-100-really"),
    ("Known limits (current state)", "known-limits-current-state"),
    ("Why *this* works: a [link](x.md)", "why-this-works-a-link"),
    ("Devices — and many   processes", "devices--and-many---processes"),
])
def test_github_anchor(heading, anchor):
    assert github_anchor(heading) == anchor


def test_repeated_headings_get_numbered_anchors():
    assert anchors("# Notes\n## Notes\n### Notes\n") == {"notes", "notes-1", "notes-2"}


def test_link_checker_reports_each_broken_link(tmp_path):
    (tmp_path / "docs").mkdir()
    (tmp_path / "docs" / "other.md").write_text("# Other page\n\n## Same\n\n## Same\n")
    (tmp_path / "code.py").write_text("a = 1\nb = 2\n")
    (tmp_path / "README.md").write_text(
        "# Top\n\n## Usage\n\n"
        "[ok](#usage) [ok](docs/other.md#same-1) ![ok](code.py) [ok](code.py#L2) [ok](https://example.org/x)\n"
        "[bad anchor](#nope) [bad\nfile](missing.md) ![bad image](img.png) [bad](docs/other.md#same-2)\n"
        "[bad line](code.py#L3) [outside](../x.md)\n\n"
        "```\n[in a fence](nowhere.md)\n```\n`[in code](nowhere.md)`\n\n[ref]: docs/gone.md\n"
    )
    problems = broken_links(tmp_path / "README.md", root=tmp_path)
    assert [p.split(" (")[0] for p in problems] == [
        "README.md:6: #nope", "README.md:7: missing.md", "README.md:7: img.png", "README.md:7: docs/other.md#same-2",
        "README.md:8: code.py#L3", "README.md:8: ../x.md", "README.md:15: docs/gone.md",
    ]


# -- the README's results are the committed data's -----------------------------------------------


def readme_results_rows(readme: str) -> dict[str, list[str]]:
    """Row label -> cells of the README's results table (rows with a mean ± sd), emphasis removed."""
    section = readme.split("\n## Results\n", 1)[1].split("\n## ", 1)[0]
    rows = {}
    for line in section.splitlines():
        if line.startswith("|") and " ± " in line:
            label, *cells = (cell.strip().strip("*") for cell in line.strip().strip("|").split("|"))
            rows[label] = cells
    return rows


def test_readme_results_table_is_the_committed_three_seed_run():
    """Every mean ± sd in the README's results table is what ``reports/bench/seeds.json`` (``bench.seeds``) holds."""
    seeds = json.loads((REPO / "reports" / "bench" / "seeds.json").read_text())["rows"]
    assert [row["seed"] for row in seeds] == [0, 1, 2]

    def column(variant: str, *metrics: str) -> list[str]:
        return [Stat(tuple(row[metric][variant] for row in seeds)).text() for metric in metrics]

    table = readme_results_rows((REPO / "README.md").read_text())
    pretrained = [cells for label, cells in table.items() if label.startswith("pre-trained")]
    assert table["raw pixels"][:1] == column("pixels", "knn")
    assert table["random init"] == column("random_init", "knn", "linear", "finetune")
    assert pretrained == [column("pretrained", "knn", "linear", "finetune")]


def test_readme_seed_0_figures_are_make_repros_metrics():
    """The results caption quotes seed 0 as ``reports/metrics.json`` (the committed ``make repro``) has it."""
    metrics = json.loads((REPO / "reports" / "metrics.json").read_text())
    random_init, pixels = metrics["baselines"]["random_init"], metrics["baselines"]["pixels"]
    quoted = (f"k-NN {metrics['knn']['20']:.1f} / {random_init['knn']['20']:.1f} random init / "
              f"{pixels['knn']['20']:.1f} raw pixels, linear {metrics['linear']['top1']:.1f} / "
              f"{random_init['linear']['top1']:.1f}, fine-tuning {metrics['finetune']['top1']:.1f} / "
              f"{random_init['finetune']['top1']:.1f}")
    assert quoted in " ".join((REPO / "README.md").read_text().split())


# -- the files a researcher looks for -------------------------------------------------------------


def test_citation_cff_cites_this_version_and_both_papers():
    cff = yaml.safe_load((REPO / "CITATION.cff").read_text())
    assert cff["cff-version"] == "1.2.0"
    assert {"message", "title", "authors"} <= set(cff)  # the format's required keys
    assert cff["type"] == "software" and cff["version"] == PYPROJECT["version"]
    assert str(cff["date-released"]) == "2026-12-03"
    cited = {ref["url"].rsplit("/", 1)[-1]: ref for ref in cff["references"]}
    assert set(cited) == {"2203.12719", "2111.07832"}  # AttMask and iBOT on arXiv
    assert cited["2203.12719"]["authors"][0]["family-names"] == "Kakogeorgiou"
    assert cited["2111.07832"]["authors"][0]["family-names"] == "Zhou"
    assert all(ref["title"] and ref["year"] == 2022 for ref in cff["references"])


def test_license_is_mit_as_declared():
    text = (REPO / "LICENSE").read_text()
    assert text.startswith("MIT License") and "Copyright (c) 2026 the AttMask reproduction authors" in text
    declared = PYPROJECT.get("license")  # pyproject.toml declares none today; if it ever does, it must agree
    assert declared is None or "MIT" in str(declared)
    assert yaml.safe_load((REPO / "CITATION.cff").read_text())["license"] == "MIT"


def test_changelog_has_a_section_for_the_current_version():
    changelog = (REPO / "CHANGELOG.md").read_text()
    version = re.escape(PYPROJECT["version"])
    assert re.search(rf"^## \[{version}\] - \d{{4}}-\d{{2}}-\d{{2}}$", changelog, re.M), (
        f"CHANGELOG.md has no '## [{PYPROJECT['version']}] - YYYY-MM-DD' section for pyproject's version"
    )
