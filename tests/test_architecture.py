"""Architecture rules, checked on the source (``ast``) and on real runs of the stages.

Layers
    Every top-level folder of the package is one layer (``LAYERS``, as the package docstring in
    src/virtual_biopsy/__init__.py lists them). A module imports only from its own folder or from
    a lower layer; folders that share a level (data and models, serving and tuning, stages and cli)
    never import each other. data and models share level 2 because neither needs the other today
    (models reads weight files through core, data never touches a network). Imports inside
    functions, relative imports, ``importlib.import_module("...")`` literals and module names held
    as strings (cli/main.py's COMMANDS table) all count.

Stage modules
    ``virtual_biopsy.stages.NAME`` is an entry point (``python -m``): nothing outside stages/
    imports one, and a stage module imports no other stage module except stages/common.py.

DVC code deps
    Each dvc.yaml stage's import closure (scripts/dvc_code_deps.py: everything
    ``python -m virtual_biopsy.stages.NAME`` can execute, function-level imports and package
    ``__init__.py`` files included) must be covered by its deps (a folder covers what is under
    it), else DVC serves stale results; and the src/ deps must be exactly what the script
    generates, so no stage reruns for code it cannot run.

DVC params
    Observed where a run is cheap: ingest, preprocess, validate_data, split, impute, evaluate and
    gate run for real, in process, on copies of conftest's tiny projects (``processed_project``,
    ``_fused_template``; impute on untrained tiny fold generators, evaluate on per-fold generator
    reports, the files train_generator would leave), while every attribute read on the loaded
    ``Params`` and its section dataclasses is recorded. A read is a dependency unless it is made by
    core/config.py itself (validating the whole file decides whether a stage may run, not what it
    writes) or from mlops/ (logging the params and their hash to MLflow, which DVC does not track).
    Each recorded key must be declared in the stage's ``params`` (a section covers its keys), and
    each declared single key (``preprocess.image_size``, not a whole section) must be read.

    train_generator and train_classifier are checked on the source instead: even with 1 epoch at
    32 px they cost ~15 s of CPU each (backward passes, ResNet checkpoints), too much for this file
    on 2 shared cores. In every function of their import closure that holds the whole ``Params``
    (an argument annotated ``Params``, or the result of ``stage_inputs``/``load_params``), each
    ``params.KEY`` and ``params.SECTION.KEY`` must be declared, a section handed on whole
    (``cfg = params.generator``) must be declared whole (it can expose any key), and ``params``
    itself may only be handed to functions that are scanned the same way or to mlops/. Both
    declare their whole sections (``generator`` / ``classifier``, plus ``seed``), so a key read on
    a branch the scan cannot see (e.g. ``serving_policy: refit``) is covered too.
"""
from __future__ import annotations

import ast
import dataclasses
import importlib.util
import os
import shutil
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
PACKAGE = "virtual_biopsy"
pytestmark = pytest.mark.usefixtures("one_torch_thread")  # the stage runs below: tiny networks

# Top-level folder of the package -> level. Higher levels may import lower ones, never the reverse,
# and two folders on one level never import each other.
LAYERS = {
    "core": 0,        # config, paths, atomic writes, process pool
    "dicom": 1,       # DICOM reading, writing, CESM marks
    "data": 2,        # synthetic data, importers, ingest, preprocess, splits, quality, cohorts
    "models": 2,      # networks, weight files, fusion
    "training": 3,    # loops, trainers, datasets, augmentation, checkpoints
    "evaluation": 4,  # metrics, scoring, settings, tables, figures, gate checks
    "mlops": 5,       # every MLflow call
    "serving": 6,     # fused pipeline, cohort imputation, predict
    "tuning": 6,      # Optuna search
    "stages": 7,      # one module per DVC stage
    "cli": 7,         # vbiopsy
}
# Imports that break the rules today, each with the reason and who fixes it. A test fails when an
# entry no longer happens, so the list cannot outlive the violation.
KNOWN_VIOLATIONS: dict[tuple[str, str], str] = {
    # (importer, imported): why, and who removes it. Empty: tuning.study's import of cli.profile
    # (a level-6 module using a level-7 one) went when exp_run_command moved to core.experiments.
}


def _load_script():
    spec = importlib.util.spec_from_file_location("dvc_code_deps", REPO / "scripts" / "dvc_code_deps.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up while the class is made
    spec.loader.exec_module(module)
    return module


deps = _load_script()
MODULES = deps.package_modules(REPO)
IMPORTS = [i for m in MODULES for i in deps.module_imports(m, MODULES, REPO)]
GRAPH = deps.import_graph(MODULES, REPO)
STAGES = deps.load_stages(REPO)


def _folder(module: str) -> str | None:
    parts = module.split(".")
    return parts[1] if len(parts) > 1 else None  # None: the package's own __init__


def _where(i) -> str:
    return f"{MODULES[i.importer]}:{i.line} imports {i.target} ({i.how})"


# ---------------------------------------------------------------------------------------------
# The import analysis itself
# ---------------------------------------------------------------------------------------------
def test_import_analysis_sees_function_relative_and_dynamic_imports(tmp_path):
    files = {
        "__init__.py": "",
        "a/__init__.py": "from virtual_biopsy.a import x\n",
        "a/x.py": "import os\n",
        "a/y.py": "def later():\n    from . import z\n    return z\n",
        "a/z.py": "",
        "a/unused.py": "",
        "b/__init__.py": "",
        "b/cmd.py": ('import importlib\nTABLE = {"y": "virtual_biopsy.a.y"}\n'
                     'def run():\n    importlib.import_module("virtual_biopsy.b.w")\n'
                     '    from virtual_biopsy.c import thing\n'),
        "b/w.py": "",
        "c/__init__.py": "thing = 1\n",
    }
    for name, text in files.items():
        path = tmp_path / "src" / PACKAGE / name
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text)
    modules = deps.package_modules(tmp_path)
    found = {(i.target, i.how) for i in deps.module_imports("virtual_biopsy.b.cmd", modules, tmp_path)}
    assert found == {("virtual_biopsy.a.y", "string"), ("virtual_biopsy.b.w", "import_module"),
                     ("virtual_biopsy.c", "from")}
    assert {i.target for i in deps.module_imports("virtual_biopsy.a.y", modules, tmp_path)} == {"virtual_biopsy.a.z"}
    run = deps.closure("virtual_biopsy.b.cmd", deps.import_graph(modules, tmp_path))
    # a/__init__ runs before a.y and imports a.x; b/__init__ and the package's own __init__ run too
    assert run == {"virtual_biopsy", "virtual_biopsy.a", "virtual_biopsy.a.x", "virtual_biopsy.a.y",
                   "virtual_biopsy.a.z", "virtual_biopsy.b", "virtual_biopsy.b.cmd", "virtual_biopsy.b.w",
                   "virtual_biopsy.c"}
    # a folder whose every module runs is one dep; a folder with a module that never runs is not
    assert deps.code_deps(run, modules) == ["src/virtual_biopsy/__init__.py", "src/virtual_biopsy/a/__init__.py",
                                            "src/virtual_biopsy/a/x.py", "src/virtual_biopsy/a/y.py",
                                            "src/virtual_biopsy/a/z.py", "src/virtual_biopsy/b",
                                            "src/virtual_biopsy/c"]


def test_import_analysis_finds_the_lazy_and_table_imports_of_this_package():
    found = {(i.importer, i.target) for i in IMPORTS}
    lazy = set()  # (module, X) of every `from X import ...` inside a function body
    for module, path in MODULES.items():
        for func in ast.walk(ast.parse((REPO / path).read_text())):
            if isinstance(func, (ast.FunctionDef, ast.AsyncFunctionDef)):
                lazy |= {(module, n.module) for n in ast.walk(func) if isinstance(n, ast.ImportFrom)
                         and n.level == 0 and n.module and n.module.startswith(PACKAGE)}
    assert lazy, "no function-level import left to try the analysis on"
    assert sorted(f"{m}: {x}" for m, x in lazy
                  if not any(i == m and (t == x or t.startswith(x + ".")) for i, t in found)) == []
    main = ast.parse((REPO / MODULES[f"{PACKAGE}.cli.main"]).read_text())
    table = next(n.value for n in main.body if isinstance(n, ast.Assign)
                 and any(isinstance(g, ast.Name) and g.id == "COMMANDS" for g in n.targets))
    commands = {v.value for v in table.values}
    assert commands and all((f"{PACKAGE}.cli.main", c) in found for c in commands)


def test_every_package_import_names_a_module_that_exists():
    assert [_where(i) for i in IMPORTS if i.target not in MODULES] == []


# ---------------------------------------------------------------------------------------------
# Layers and stage modules
# ---------------------------------------------------------------------------------------------
def test_every_package_folder_has_a_layer():
    folders = {_folder(m) for m in MODULES} - {None}
    assert sorted(folders - set(LAYERS)) == [], "add the new folder to LAYERS (and the package docstring)"
    assert sorted(set(LAYERS) - folders) == [], "LAYERS names a folder that no longer exists"


def _layer_violations() -> dict[tuple[str, str], str]:
    out = {}
    for i in IMPORTS:
        source, target = _folder(i.importer), _folder(i.target)
        if i.target not in MODULES or target is None or source == target:
            continue  # the package's own (empty) __init__ is below everything
        if source is None or LAYERS[target] >= LAYERS[source]:
            out[(i.importer, i.target)] = _where(i)
    return out


def test_no_module_imports_a_higher_layer_or_a_sibling_folder():
    found = {key: where for key, where in _layer_violations().items() if key not in KNOWN_VIOLATIONS}
    assert list(found.values()) == []


def test_known_layer_violations_still_happen():
    """An entry of KNOWN_VIOLATIONS that no longer happens must leave the list."""
    assert sorted(set(KNOWN_VIOLATIONS) - set(_layer_violations())) == []


def test_stage_modules_are_imported_by_nothing_but_common_by_stages():
    common = f"{PACKAGE}.stages.common"
    bad = [_where(i) for i in IMPORTS if _folder(i.target) == "stages"
           and not (_folder(i.importer) == "stages" and i.target in (common, f"{PACKAGE}.stages"))]
    assert bad == []


# ---------------------------------------------------------------------------------------------
# dvc.yaml code deps
# ---------------------------------------------------------------------------------------------
def test_every_dvc_stage_runs_a_stage_module_through_the_launcher():
    for stage in STAGES:
        assert stage.module is not None and stage.module in MODULES, f"{stage.name}: {stage.cmd!r}"
        assert stage.cmd.startswith("sh scripts/python.sh -m "), f"{stage.name}: {stage.cmd!r}"


@pytest.mark.parametrize("stage", STAGES, ids=[s.name for s in STAGES])
def test_dvc_deps_cover_the_stage_import_closure(stage):
    run = deps.closure(stage.module, GRAPH)
    assert deps.uncovered(stage, run, MODULES) == [], (
        f"{stage.name} can run these modules but dvc.yaml does not list them: "
        "python scripts/dvc_code_deps.py --write")


def test_dvc_code_deps_are_exactly_the_generated_ones():
    """No stage lists code it cannot run (it would rerun for nothing) or lists it other than generated."""
    assert deps.differences(REPO) == [], "python scripts/dvc_code_deps.py --write"


def test_folder_deps_do_not_reach_beyond_the_closure():
    """ingest must not rerun because evaluation/ (which it never runs) changed."""
    ingest = next(s for s in STAGES if s.name == "ingest")
    assert not any(deps.covers(d, "src/virtual_biopsy/evaluation/metrics.py") for d in ingest.deps)
    assert any(deps.covers(d, "src/virtual_biopsy/data/layout.py") for d in ingest.deps)
    preprocess = next(s for s in STAGES if s.name == "preprocess")
    assert any(deps.covers(d, "src/virtual_biopsy/dicom/read.py") for d in preprocess.deps)


# ---------------------------------------------------------------------------------------------
# dvc.yaml params, observed on real stage runs
# ---------------------------------------------------------------------------------------------
class ParamsReads:
    """Records which params keys are read, and where from, while it is installed."""

    def __init__(self) -> None:
        self.keys: set[str] = set()
        self._tracked: dict[int, tuple[object, str]] = {}  # id -> (instance, "section." prefix)

    def track(self, params, prefix: str = "") -> None:
        """Track ``params`` and every section in it, nested ones too (pretrain.cohort.patients)."""
        self._tracked[id(params)] = (params, prefix)
        for f in dataclasses.fields(params):
            value = object.__getattribute__(params, f.name)
            if dataclasses.is_dataclass(value):
                self.track(value, f"{prefix}{f.name}.")

    @staticmethod
    def _not_a_dependency() -> bool:
        """Read by core/config.py (validation, hashing) or from mlops/ (logging to MLflow)."""
        frame = sys._getframe(2)
        config, mlops = os.sep + os.path.join(PACKAGE, "core", "config.py"), os.sep + os.path.join(PACKAGE, "mlops", "")
        while frame is not None:
            name = frame.f_code.co_filename
            if name.endswith(config) or mlops in name:
                return True
            frame = frame.f_back
        return False

    def install(self, monkeypatch) -> None:
        from virtual_biopsy.core import config

        def nested(instance) -> set[type]:
            found = set()
            for f in dataclasses.fields(instance):
                value = getattr(instance, f.name)
                if dataclasses.is_dataclass(value):
                    found |= {type(value), *nested(value)}
            return found

        sections = nested(config.Params())
        fields = {cls: {f.name for f in dataclasses.fields(cls)} for cls in (config.Params, *sections)}
        reads = self

        def __getattribute__(obj, name):
            value = object.__getattribute__(obj, name)
            entry = reads._tracked.get(id(obj))
            if (entry is not None and entry[0] is obj and name in fields[type(obj)]
                    and not dataclasses.is_dataclass(value) and not reads._not_a_dependency()):
                reads.keys.add(entry[1] + name)
            return value

        for cls in fields:
            monkeypatch.setattr(cls, "__getattribute__", __getattribute__)
        original_init = config.Params.__init__

        def __init__(obj, *args, **kwargs):
            original_init(obj, *args, **kwargs)
            reads.track(obj)

        monkeypatch.setattr(config.Params, "__init__", __init__)


TINY_GENERATOR = {"ngf": 4, "ndf": 4, "n_residual_blocks": 1}
DYNAMIC = ("ingest", "preprocess", "validate_data", "split", "observer_ceiling", "impute", "evaluate", "gate",
           "pretrain_cohort", "import_pretrain", "saliency_eval")
STATIC = ("train_generator", "train_classifier",  # too slow to run here, even tiny: checked on the source
          "pretrain_generator")


def _copy_with_models(source: Path, dest: Path) -> Path:
    """A copy of a whole project (models, reports); weights are read only: links, as fused_project does."""
    def link_models(src: str, dst: str) -> None:
        (os.link if f"{os.sep}models{os.sep}" in src else shutil.copy2)(src, dst)

    return Path(shutil.copytree(source, dest, copy_function=link_models, ignore=shutil.ignore_patterns("mlruns")))


def _write_untrained_generators(root: Path) -> None:
    """What train_generator leaves for impute, without the training: untrained tiny fold generators."""
    import pandas as pd

    from virtual_biopsy.core.config import load_params
    from virtual_biopsy.core.paths import ProjectPaths
    from virtual_biopsy.models import ResnetGenerator
    from virtual_biopsy.models.weights import save_generator_weights

    paths, params = ProjectPaths(root), load_params(root / "params.yaml")
    cfg = params.generator
    folds = sorted(int(f) for f in pd.read_csv(paths.splits)["fold"].unique())
    for view in cfg.views:
        for fold in folds:
            net = ResnetGenerator(channels=1, ngf=cfg.ngf, n_residual_blocks=cfg.n_residual_blocks)
            save_generator_weights(paths.generator_weights(view, fold), net.state_dict(), cfg, view=view, fold=fold,
                                   image_size=params.preprocess.image_size)


def _link_classifiers(source: Path, root: Path) -> None:
    """The fused template's trained tiny classifiers (read only: hard links) for saliency_eval."""
    shutil.copytree(source / "models" / "classifier", root / "models" / "classifier", copy_function=os.link,
                    dirs_exist_ok=True)


def _write_generator_reports(root: Path) -> None:
    """Generator reports with per-fold entries (the fused template's carry only means, for the gate)."""
    import json

    from virtual_biopsy.evaluation.predictions import GENERATOR_FOLD_KEYS

    for view in ("CC", "MLO"):
        folds = [{**{k: 0.5 for k in GENERATOR_FOLD_KEYS}, "fold": fold, "psnr": 20.0 + fold} for fold in (0, 1)]
        path = root / "reports" / "generator" / f"{view}.json"
        path.write_text(json.dumps({**json.loads(path.read_text()), "view": view, "folds": folds}))


@pytest.fixture(scope="module")
def params_reads(processed_project, _fused_template, copy_project, tmp_path_factory) -> dict[str, set[str]]:
    """Stage definition -> the params keys it read, each fast stage run once for real (module docstring)."""
    from virtual_biopsy.stages import (
        evaluate,
        gate,
        import_pretrain,
        impute,
        ingest,
        observer_ceiling,
        preprocess,
        pretrain_cohort,
        saliency_eval,
        split,
        validate_data,
    )

    base = tmp_path_factory.mktemp("params-reads")
    data_root = copy_project(processed_project, base / "data",
                             {"validate_data": {"min_patients": 10}, "generator": TINY_GENERATOR}).root
    fused_root = _copy_with_models(_fused_template, base / "fused")
    runs = [
        ("ingest", ingest, data_root, ["--no-mlflow"]),
        ("preprocess", preprocess, data_root, ["--no-mlflow"]),
        ("validate_data", validate_data, data_root, ["--no-mlflow"]),
        ("split", split, data_root, ["--no-mlflow"]),
        ("observer_ceiling", observer_ceiling, data_root, ["--no-mlflow"]),
        ("pretrain_cohort", pretrain_cohort, data_root, []),
        ("import_pretrain", import_pretrain, data_root, ["--no-mlflow"]),
        ("impute", impute, data_root, ["--no-mlflow"]),
        ("saliency_eval", saliency_eval, data_root, ["--no-mlflow"]),
        ("gate", gate, fused_root, []),  # the gate always logs: MLflow in the copy's embedded store
        ("evaluate", evaluate, fused_root, ["--no-mlflow"]),  # after the gate: it rewrites metrics.json
    ]
    prepare = {"impute": lambda: _write_untrained_generators(data_root),
               "saliency_eval": lambda: _link_classifiers(_fused_template, data_root),
               "evaluate": lambda: _write_generator_reports(fused_root)}
    observed = {}
    for name, stage, root, argv in runs:
        prepare.get(name, lambda: None)()
        reads = ParamsReads()
        with pytest.MonkeyPatch.context() as monkeypatch:
            reads.install(monkeypatch)
            code = stage.main(["--root", str(root), *argv])
        assert code == 0, f"{name} failed on the tiny project {root}"
        observed[name] = reads.keys
    return observed


def _covered(key: str, declared: tuple[str, ...]) -> bool:
    return any(key == d or key.startswith(d + ".") for d in declared)


DEFINITIONS = {}
for _stage in STAGES:
    DEFINITIONS.setdefault(_stage.definition, _stage)


def test_every_dvc_stage_has_its_params_checked():
    assert sorted(DEFINITIONS) == sorted(DYNAMIC + STATIC)


@pytest.mark.parametrize("definition", DYNAMIC)
def test_stage_reads_only_the_params_dvc_yaml_declares(params_reads, definition):
    stage = DEFINITIONS[definition]
    read = params_reads[definition]
    assert read, f"{definition}: no params read at all (is the recorder working?)"
    assert sorted(k for k in read if not _covered(k, stage.params)) == [], (
        f"{definition} reads params keys dvc.yaml does not declare: a change to them would not rerun it")
    single_keys = [d for d in stage.params if "." in d]
    assert sorted(d for d in single_keys if not any(_covered(k, (d,)) for k in read)) == [], (
        f"{definition} declares params keys it never reads: a change to them reruns it for nothing")


# --- the training stages: what the code can read, from the source -----------------------------
def _annotated_params(annotation) -> bool:
    return annotation is not None and any(
        (isinstance(n, ast.Name) and n.id == "Params") or (isinstance(n, ast.Attribute) and n.attr == "Params")
        or (isinstance(n, ast.Constant) and isinstance(n.value, str) and "Params" in n.value)
        for n in ast.walk(annotation))


def _call_name(node) -> str | None:
    func = node.func if isinstance(node, ast.Call) else None
    return func.attr if isinstance(func, ast.Attribute) else func.id if isinstance(func, ast.Name) else None


def _params_holders(func) -> set[str]:
    """Names that hold the whole Params in ``func``: annotated arguments, ``stage_inputs``/``load_params`` results."""
    args = func.args
    names = {a.arg for a in (*args.posonlyargs, *args.args, *args.kwonlyargs) if _annotated_params(a.annotation)}
    for node in ast.walk(func):
        if isinstance(node, ast.Assign) and _call_name(node.value) in ("stage_inputs", "load_params"):
            for target in node.targets:
                if isinstance(target, ast.Tuple) and _call_name(node.value) == "stage_inputs":
                    target = target.elts[1]
                if isinstance(target, ast.Name):
                    names.add(target.id)
    return names


def static_params_use(definition: str) -> tuple[set[str], set[str], list[str]]:
    """(keys read, sections handed on whole, uses not followed) of the Params object in every
    function that holds it in the stage's closure, leaving out mlops/ (logging) and what is reached
    only through it, and core/config.py.

    The convention (docs/CONTRIBUTING.md) is that a stage passes the section dataclass down, so a
    section handed on whole can expose any of its keys; the whole Params may only go to functions
    that declare it (scanned too) or to mlops/."""
    from virtual_biopsy.core.config import Params

    sections = {f.name for f in dataclasses.fields(Params) if dataclasses.is_dataclass(getattr(Params(), f.name))}
    stage = DEFINITIONS[definition]
    # what the stage runs without going through mlops/ (gate_checks, say, is reachable only that way)
    outside_mlops = {m: {t for t in targets if _folder(t) != "mlops"} for m, targets in GRAPH.items()}
    run = sorted(m for m in deps.closure(stage.module, outside_mlops) if m != f"{PACKAGE}.core.config")
    trees = {m: ast.parse((REPO / MODULES[m]).read_text()) for m in run}
    holders_by_name, logging = set(), set()
    for m in MODULES:
        if _folder(m) == "mlops":
            logging |= {n.name for n in ast.walk(ast.parse((REPO / MODULES[m]).read_text()))
                        if isinstance(n, (ast.FunctionDef, ast.AsyncFunctionDef))}
    for tree in trees.values():
        holders_by_name |= {n.name for n in ast.walk(tree) if isinstance(n, (ast.FunctionDef, ast.AsyncFunctionDef))
                            and any(_annotated_params(a.annotation) for a in (*n.args.args, *n.args.kwonlyargs))}
    keys, whole, unfollowed = set(), set(), []
    for m, tree in trees.items():
        parents = {child: node for node in ast.walk(tree) for child in ast.iter_child_nodes(node)}
        for func in (n for n in ast.walk(tree) if isinstance(n, (ast.FunctionDef, ast.AsyncFunctionDef))):
            holders = _params_holders(func)
            for node in ast.walk(func):
                if not (isinstance(node, ast.Name) and node.id in holders and isinstance(node.ctx, ast.Load)):
                    continue
                parent = parents[node]
                if isinstance(parent, ast.Attribute):
                    up = parents.get(parent)
                    if parent.attr not in sections:
                        keys.add(parent.attr)
                    elif isinstance(up, ast.Attribute) and up.value is parent:
                        keys.add(f"{parent.attr}.{up.attr}")
                    else:
                        whole.add(parent.attr)
                    continue
                call = parent if isinstance(parent, ast.Call) else parents.get(parent)
                callee = _call_name(call) if isinstance(call, ast.Call) else None
                # executor.job(name, function, params=...) defers a call of a job function, which
                # declares Params and is scanned where it is defined
                if callee is None or callee not in holders_by_name | logging | {"job"}:
                    unfollowed.append(f"{MODULES[m]}:{node.lineno} {func.name} hands params to "
                                      f"{callee or 'an expression'}")
    return keys, whole, unfollowed


@pytest.mark.parametrize("definition", STATIC)
def test_training_stage_code_reads_only_declared_params(definition):
    stage = DEFINITIONS[definition]
    keys, whole, unfollowed = static_params_use(definition)
    assert keys or whole, f"{definition}: found no params use at all (is the scan working?)"
    assert unfollowed == [], "the scan cannot follow these; give the callee a Params annotation or pass a section"
    assert sorted(k for k in keys if not _covered(k, stage.params)) == []
    # executor (where fold jobs run) is deliberately no stage's param: the outputs are the same bytes
    # whichever executor runs them (tests/test_executor.py)
    assert sorted(s for s in whole if s not in stage.params and s != "executor") == [], (
        f"{definition} hands these sections on whole: any of their keys can matter, declare the section")
