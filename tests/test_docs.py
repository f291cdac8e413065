"""The documentation stays true to the repository: every relative link in README.md and docs/*.md resolves (the file
exists; an #anchor names a heading of that page), every environment variable the code reads is in
docs/environment.md's tables, and the generated blocks (README's performance summary, docs/performance.md,
docs/objectives.md's tables) are what their generators write from the committed results. Text, AST and the report
scripts only: no kernels run."""
from __future__ import annotations

import ast
import re
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
PAGES = [REPO / "README.md"] + sorted((REPO / "docs").glob("*.md"))
ENV_PAGE = REPO / "docs" / "environment.md"

# ------------------------------------------------------------------------------------------------ markdown
FENCE = re.compile(r"^\s*(```|~~~)")
LINK = re.compile(r"!?\[(?:[^\[\]]|\[[^\]]*\])*\]\(([^)\s]+)(?:\s+\"[^\"]*\")?\)")
GENERATED = re.compile(r"<!-- ([\w-]+):start -->.*?<!-- \1:end -->", re.S)


def prose_lines(text: str) -> list[str]:
    """The lines outside fenced code blocks."""
    out, fenced = [], False
    for line in text.splitlines():
        if FENCE.match(line):
            fenced = not fenced
            continue
        if not fenced:
            out.append(line)
    return out


def github_anchor(heading: str) -> str:
    """The anchor GitHub gives a heading: lower case, inline markup and punctuation dropped, spaces to hyphens."""
    text = re.sub(r"\[([^\]]*)\]\([^)]*\)", r"\1", heading)  # a link keeps its text
    text = text.strip().lower().replace("`", "")
    text = re.sub(r"[^\w\- ]", "", text)
    return text.replace(" ", "-")


def anchors(page: Path) -> set[str]:
    seen: dict[str, int] = {}
    out = set()
    for line in prose_lines(page.read_text()):
        m = re.match(r"^(#{1,6})\s+(.*?)\s*#*\s*$", line)
        if not m:
            continue
        base = github_anchor(m.group(2))
        n = seen.get(base, 0)
        seen[base] = n + 1
        out.add(base if n == 0 else f"{base}-{n}")
    return out


def links(page: Path) -> list[str]:
    """Link targets outside code (a link's text may run over a line break)."""
    text = re.sub(r"`[^`]*`", "", "\n".join(prose_lines(page.read_text())))  # inline code holds examples, not links
    return LINK.findall(text)


def test_the_pages_exist():
    names = {p.name for p in PAGES}
    for page in ("README.md", "design.md", "performance.md", "api.md", "compile_and_fsdp.md", "modern_blocks.md",
                 "objectives.md", "byo_network.md", "cli.md", "scaling.md", "testing.md", "benchmarks.md",
                 "environment.md"):
        assert page in names, f"docs/{page} is missing"


@pytest.mark.parametrize("page", PAGES, ids=lambda p: str(p.relative_to(REPO)))
def test_every_relative_link_resolves(page):
    broken = []
    for target in links(page):
        if re.match(r"^[a-z][a-z0-9+.-]*:", target):  # http:, https:, mailto: ...
            continue
        path, _, anchor = target.partition("#")
        dest = (page.parent / path).resolve() if path else page
        if not dest.exists():
            broken.append(f"{target}: no such file")
        elif anchor and dest.suffix == ".md" and anchor not in anchors(dest):
            broken.append(f"{target}: no heading with anchor #{anchor} in {dest.relative_to(REPO)}")
        elif anchor and dest.suffix != ".md":
            broken.append(f"{target}: an anchor into a file that is not a markdown page")
    assert not broken, f"{page.relative_to(REPO)}: " + "; ".join(broken)


@pytest.mark.parametrize("page", PAGES, ids=lambda p: str(p.relative_to(REPO)))
def test_written_text_cites_no_design_brief_and_no_issue_numbers(page):
    """The project's design is docs/design.md; decisions are stated, not referred to by issue. Generated blocks
    belong to their generators and are checked there."""
    text = GENERATED.sub("", page.read_text())
    assert "DESIGN.md" not in text, f"{page.name} cites DESIGN.md: cite docs/design.md's sections instead"
    found = re.findall(r"\bissues? #?\d+", text, flags=re.I)
    assert not found, f"{page.name} mentions {found}: say what was decided and why instead"


def test_the_readme_stays_short_and_keeps_its_generated_blocks():
    text = (REPO / "README.md").read_text()
    assert len(text.splitlines()) <= 260, "README.md grew past a screenful or two: move the detail into docs/"
    for name in ("demo", "perf-summary"):
        assert text.count(f"<!-- {name}:start -->") == 1 and text.count(f"<!-- {name}:end -->") == 1, name
    assert "\nbash scripts/setup.sh && .venv/bin/python -m meanflow train --preset mnist\n" in text
    # .ci/run runs the README's test line itself (the first line that starts so): it must be there
    assert "\nbash scripts/setup.sh && .venv/bin/python -m pytest -q" in text


@pytest.mark.parametrize("page, names", [("performance.md", ("perf",)),
                                         ("objectives.md", ("objectives-table", "learning")),
                                         ("byo_network.md", ("byo-example",))])
def test_docs_keep_the_markers_their_generators_and_tests_use(page, names):
    text = (REPO / "docs" / page).read_text()
    for name in names:
        assert text.count(f"<!-- {name}:start -->") == 1 and text.count(f"<!-- {name}:end -->") == 1, (page, name)


def _block(text: str, name: str) -> str:
    m = re.search(f"<!-- {name}:start -->\n(.*?)\n<!-- {name}:end -->", text, re.S)
    assert m, f"no {name} block"
    return m.group(1)


def test_generated_blocks_are_what_their_generators_write(monkeypatch):
    """docs/performance.md's section and the README's summary are what bench/report.py writes from the folders its
    own command names; docs/objectives.md's tables what bench/learn_objectives.py writes from the committed rows.
    After new results or a change of either script, rerun the command the block names."""
    monkeypatch.syspath_prepend(str(REPO))
    monkeypatch.chdir(REPO)  # the folders are named relative to the repository
    from bench import learn_objectives, report

    page, readme = Path("docs/performance.md"), Path("README.md")
    full = _block(page.read_text(), "perf")
    command = re.search(r"`python bench/report.py ((?:\S+ )+)--readme README.md`", full)
    assert command, "docs/performance.md's section no longer names the command that made it"
    folders = [Path(f) for f in command.group(1).split()]
    assert full == report.readme_section(folders, page), "docs/performance.md is stale: rerun " + command.group(0)
    assert _block(readme.read_text(), "perf-summary") == report.readme_summary(folders, page, readme), \
        "the README's performance summary is stale: rerun " + command.group(0)

    data = learn_objectives.load_rows()
    objectives = Path("docs/objectives.md").read_text()
    assert _block(objectives, "learning") == learn_objectives.learning_tables(data), \
        "docs/objectives.md is stale: rerun python bench/learn_objectives.py --table"
    assert _block(objectives, "objectives-table") == learn_objectives.compact_table(data["rows"]), \
        "docs/objectives.md is stale: rerun python bench/learn_objectives.py --table"


# ------------------------------------------------------------------------------------------------ environment
PY_ROOTS = ("meanflow", "mfkernels", "bench", "tools", "scripts", "tests")
SH_FILES = sorted({*REPO.glob("bench/*.sh"), *REPO.glob("tools/*.sh"), *REPO.glob("scripts/*.sh"),
                   REPO / ".ci" / "run"})
CPP_FILES = sorted({*REPO.glob("csrc/**/*.cpp"), *REPO.glob("csrc/**/*.cu"), *REPO.glob("csrc/**/*.h")})
PROJECT_PREFIX = r"(?:MFKERNELS|MEANFLOW|MF|SUITE|SETUP|GPU_COMPILE)_"
# Reads whose name is a run-time value by design: (file, function) -> why.
DYNAMIC_READS = {
    ("bench/bench_attention.py", "_env"): "saves and restores the A/B switches of its VARIANTS table (named there)",
}


def python_files() -> list[Path]:
    files = [REPO / "setup.py"]
    for root in PY_ROOTS:
        files += [p for p in (REPO / root).rglob("*.py") if "results" not in p.parts]
    return sorted(files)


def _is_environ(node: ast.AST) -> bool:
    return isinstance(node, ast.Attribute) and node.attr == "environ" and isinstance(node.value, ast.Name) \
        and node.value.id == "os"


class _EnvReads(ast.NodeVisitor):
    """Names of environment variables a module reads: os.environ.get / setdefault / pop, os.getenv, os.environ[...]
    loads, `... in os.environ`. An argument is resolved when it is a literal, a module-level constant (str, or a tuple
    / list / dict of str), or the loop variable of a for / comprehension over one; else it is reported."""

    def __init__(self, tree: ast.Module):
        self.constants: dict[str, list[str]] = {}
        for stmt in tree.body:
            if isinstance(stmt, ast.Assign) and len(stmt.targets) == 1 and isinstance(stmt.targets[0], ast.Name):
                values = _strings(stmt.value, {})
                if values is not None:
                    self.constants[stmt.targets[0].id] = values
        self.loops: list[dict[str, list[str]]] = []
        self.function = "<module>"
        self.names: set[str] = set()
        self.unresolved: list[tuple[str, int]] = []

    def _scope(self) -> dict[str, list[str]]:
        scope = dict(self.constants)
        for frame in self.loops:
            scope.update(frame)
        return scope

    def _read(self, arg: ast.AST, line: int) -> None:
        values = _strings(arg, self._scope())
        if values is None:
            self.unresolved.append((self.function, line))
        else:
            self.names.update(values)

    def visit_FunctionDef(self, node):
        outer, self.function = self.function, node.name
        self.generic_visit(node)
        self.function = outer

    visit_AsyncFunctionDef = visit_FunctionDef

    def _with_targets(self, target, iterable, body):
        values = _strings(iterable, self._scope())
        frame = {target.id: values} if values is not None and isinstance(target, ast.Name) else {}
        self.loops.append(frame)
        for node in body:
            self.visit(node)
        self.loops.pop()

    def visit_For(self, node):
        self.visit(node.iter)
        self._with_targets(node.target, node.iter, node.body + node.orelse)

    def _comprehension(self, node):
        frames = 0
        for gen in node.generators:
            self.visit(gen.iter)
            values = _strings(gen.iter, self._scope())
            self.loops.append({gen.target.id: values} if values is not None and isinstance(gen.target, ast.Name)
                              else {})
            frames += 1
            for cond in gen.ifs:
                self.visit(cond)
        for part in ("elt", "key", "value"):
            if getattr(node, part, None) is not None:
                self.visit(getattr(node, part))
        del self.loops[len(self.loops) - frames:]

    visit_ListComp = visit_SetComp = visit_GeneratorExp = visit_DictComp = _comprehension

    def visit_Call(self, node):
        f = node.func
        if node.args and isinstance(f, ast.Attribute) and (
                (f.attr in ("get", "setdefault", "pop") and _is_environ(f.value))
                or (f.attr == "getenv" and isinstance(f.value, ast.Name) and f.value.id == "os")):
            self._read(node.args[0], node.lineno)
        self.generic_visit(node)

    def visit_Subscript(self, node):
        if _is_environ(node.value) and isinstance(node.ctx, ast.Load):
            self._read(node.slice, node.lineno)
        self.generic_visit(node)

    def visit_Compare(self, node):
        for op, right in zip(node.ops, node.comparators):
            if isinstance(op, (ast.In, ast.NotIn)) and _is_environ(right):
                self._read(node.left, node.lineno)
        self.generic_visit(node)


def _strings(node: ast.AST, scope: dict[str, list[str]]) -> list[str] | None:
    """The strings an expression stands for, or None when it is not a constant of strings."""
    if isinstance(node, ast.Constant) and isinstance(node.value, str):
        return [node.value]
    if isinstance(node, ast.Name):
        return scope.get(node.id)
    if isinstance(node, (ast.Tuple, ast.List, ast.Set)):
        parts = [_strings(e, scope) for e in node.elts]
        return None if any(p is None for p in parts) else [s for p in parts for s in p]
    if isinstance(node, ast.Dict):
        parts = [_strings(v, scope) for v in node.values]
        return None if any(p is None for p in parts) else [s for p in parts for s in p]
    if isinstance(node, ast.Subscript):  # CONSTANT_DICT[key]: any of its values
        return _strings(node.value, scope)
    if isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute) and node.func.attr in ("values", "keys"):
        return _strings(node.func.value, scope)
    return None


def env_reads() -> tuple[dict[str, set[str]], list[str]]:
    """{variable: files that read it}, and the reads whose name could not be resolved."""
    found: dict[str, set[str]] = {}
    unresolved = []

    def add(name: str, path: Path):
        found.setdefault(name, set()).add(str(path.relative_to(REPO)))

    for path in python_files():
        rel = str(path.relative_to(REPO))
        tree = ast.parse(path.read_text(), filename=rel)
        visitor = _EnvReads(tree)
        visitor.visit(tree)
        for name in visitor.names:
            add(name, path)
        unresolved += [f"{rel}:{line} ({fn})" for fn, line in visitor.unresolved if (rel, fn) not in DYNAMIC_READS]
        # project switches named anywhere in the code (tables of A/B switches, recorded variables)
        for node in ast.walk(tree):
            if isinstance(node, ast.Constant) and isinstance(node.value, str) and \
                    re.fullmatch(PROJECT_PREFIX + r"[A-Z0-9_]+", node.value):
                add(node.value, path)
    for path in SH_FILES:
        text = path.read_text()
        for name in re.findall(r"\$\{([A-Z][A-Z0-9_]*)(?::?[-=+?])", text):  # ${NAME:-default}: read from outside
            add(name, path)
        for name in re.findall(r"\$\{?(" + PROJECT_PREFIX + r"[A-Z0-9_]+)", text):
            add(name, path)
        for prefix in re.findall(r"\"([A-Z][A-Z0-9_]*_)\$\{\w+\^\^\}\"", text):  # a family: PREFIX_${stage^^}
            add(prefix + "<STAGE>", path)
    for path in CPP_FILES:
        for name in re.findall(r"getenv\(\s*\"([A-Z][A-Z0-9_]*)\"", path.read_text()):
            add(name, path)
    return found, unresolved


def documented() -> set[str]:
    """Every backticked name in the first column of docs/environment.md's tables."""
    names = set()
    for line in ENV_PAGE.read_text().splitlines():
        if line.startswith("|") and not line.startswith("|---"):
            first = line.split("|")[1]
            names.update(re.findall(r"`([A-Z][A-Z0-9_]*(?:<[A-Z]+>|\*)?)`", first))
    return names


def test_env_scanner_sees_the_known_reads():
    """The scanner itself: reads of every form the code uses are found (a scanner that finds nothing passes too)."""
    found, _ = env_reads()
    for name, where in (("MEANFLOW_INCEPTION", "meanflow/evaluation/evaluate.py"),       # module constant
                        ("MFKERNELS_ATTN_TMA", "mfkernels/attention/_levers.py"),        # ENV[name] of a dict
                        ("MASTER_PORT", "meanflow/runtime/distributed.py"),              # loop over a tuple
                        ("MALLOC_ARENA_MAX", "bench/common.py"),                         # comprehension over a tuple
                        ("SUITE_BUDGET", "bench/gpu_suite.sh"),                          # ${NAME:-default}
                        ("SUITE_LIMIT_<STAGE>", "bench/gpu_suite.sh"),                   # a family of names
                        ("MFKERNELS_CPU_ISA", "csrc/target.cpp"),                        # getenv in C++
                        ("MFKERNELS_BUILD_EXT", "setup.py")):
        assert where in found.get(name, set()), (name, where, found.get(name))


def test_every_environment_variable_the_code_reads_is_documented():
    found, unresolved = env_reads()
    assert not unresolved, ("environment reads whose variable name the test cannot tell (use a literal or a "
                            "module-level constant, or list the function in DYNAMIC_READS): " + ", ".join(unresolved))
    names = documented()
    missing = {n: sorted(w) for n, w in found.items() if n not in names}
    assert not missing, f"read by the code but not in docs/environment.md: {missing}"


def test_documented_project_switches_are_read_somewhere():
    """No stale rows: a documented switch of this project is still read (or set) by the code."""
    found, _ = env_reads()
    stale = [n for n in documented() if re.match(PROJECT_PREFIX, n) and n not in found]
    assert not stale, f"docs/environment.md documents switches the code no longer reads: {stale}"
