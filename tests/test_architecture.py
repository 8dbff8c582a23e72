"""The house: imports run one way, from the bottom floor up, without circles, and importing a
module does nothing but define things (docs/architecture.md).

The import graph is read from the sources (every ``import`` of a ``vtn_tf`` module, at the top
of a file or inside a function); the side effects are looked for in fresh interpreters.
"""

import ast
import json
import os
import pathlib
import subprocess
import sys

import pytest

REPO = pathlib.Path(__file__).resolve().parents[1]
PACKAGE = REPO / "vtn_tf"

# Floor of each subpackage (and of the modules at the package's top), bottom first. A module may
# import its own floor and the floors below it, never one above.
FLOORS = {
    "core": 1,            # spatial maths on tensors, no Keras, no files
    "io": 2,              # files, no TensorFlow
    "preprocessing": 3,   # the input contract, initial alignment, augmentation
    "nn": 4,              # losses, layers, networks, the cascade, checkpoints
    "qc": 5,              # quality-control figures of a registration
    "training": 5,        # configuration, data pipelines, the training run
    "registration": 6,    # settings, the pipeline and its stages
    "evaluation": 7,      # protocols, native evaluation, baselines, statistics
    "serving": 7,         # the SavedModel export, the warm local server
    "cli": 8,             # one module per command
}
# TensorFlow 2.21 leaves oneDNN off on some x86 CPUs; `vtn_tf/__init__.py` turns it on where the
# user has not chosen, before TensorFlow loads. The one change of the environment an import may make.
ONEDNN = "TF_ENABLE_ONEDNN_OPTS"


def module_name(path):
    parts = list(path.relative_to(REPO).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


MODULES = {module_name(p): p for p in sorted(PACKAGE.rglob("*.py"))}


def resolve(name):
    """The module an import names: itself, or the package or module that defines ``name``."""
    while name not in MODULES and "." in name:
        name = name.rsplit(".", 1)[0]
    return name


def imports_of(path):
    """The ``vtn_tf`` modules ``path`` imports, with the line of each import."""
    tree = ast.parse(path.read_text(), str(path))
    found = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            found += [(resolve(alias.name), node.lineno) for alias in node.names if alias.name.startswith("vtn_tf.")]
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and (node.module or "").startswith("vtn_tf"):
            for alias in node.names:
                target = f"{node.module}.{alias.name}"
                found.append((resolve(target) if target in MODULES else resolve(node.module), node.lineno))
    return found


GRAPH = {name: imports_of(path) for name, path in MODULES.items()}


def floor(name):
    parts = name.split(".")
    return FLOORS.get(parts[1]) if len(parts) > 1 else 0


def test_every_module_has_a_floor():
    missing = sorted(name for name in MODULES if name != "vtn_tf" and floor(name) is None)
    assert not missing, f"modules outside the floors (add their package to FLOORS and docs/architecture.md): {missing}"


def test_no_floor_imports_one_above_it():
    wrong = [f"{MODULES[name].relative_to(REPO)}:{line} ({name}, floor {floor(name)}) imports {target} "
             f"(floor {floor(target)})"
             for name, targets in GRAPH.items() if name != "vtn_tf"
             for target, line in targets if target != "vtn_tf" and (floor(target) or 0) > (floor(name) or 0)]
    assert not wrong, "\n".join(wrong)


def test_no_module_imports_the_package_facade_from_inside():
    """Library modules name the module they use (``vtn_tf.core.sampling``), not ``vtn_tf`` itself."""
    wrong = [f"{name}:{line}" for name, targets in GRAPH.items() for target, line in targets if target == "vtn_tf"]
    assert not wrong, wrong


def test_no_import_circles():
    edges = {name: sorted({target for target, _ in targets if target != name}) for name, targets in GRAPH.items()}
    state, circles = {}, []

    def visit(name, path):
        state[name] = "open"
        for target in edges.get(name, ()):
            if state.get(target) == "open":
                circles.append(path[path.index(target):] + [target] if target in path else [name, target])
            elif target not in state:
                visit(target, path + [target])
        state[name] = "done"

    for name in sorted(edges):
        if name not in state:
            visit(name, [name])
    assert not circles, "import circles:\n" + "\n".join(" -> ".join(c) for c in circles)


def test_no_private_name_is_imported_across_modules():
    wrong = []
    for name, path in MODULES.items():
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.ImportFrom) and (node.module or "").startswith("vtn_tf"):
                wrong += [f"{name}: {node.module}.{a.name}" for a in node.names if a.name.startswith("_")]
    assert not wrong, wrong


# ---- importing does nothing but define things -------------------------------------------------
PROBE = r"""
import importlib, json, os, sys
# Third-party libraries first: what they do on import (Keras' ~/.keras, font caches) is theirs.
for library in ("numpy", "scipy.ndimage", "nibabel", "absl.flags", "tensorflow", "keras", "SimpleITK"):
    try:
        importlib.import_module(library)
    except ImportError:
        pass

def files():
    found = set()
    for root in (os.environ["HOME"], os.getcwd()):
        for folder, _, names in os.walk(root):
            found.update(os.path.join(folder, n) for n in names)
            found.add(folder)
    return found

before_env, before_files, changes = dict(os.environ), files(), []
for name in sys.argv[1:]:
    importlib.import_module(name)
    env, found = dict(os.environ), files()
    changed = sorted(k for k in set(env) | set(before_env) if env.get(k) != before_env.get(k))
    created = sorted(found - before_files)
    if changed or created:
        changes.append({"module": name, "environment": {k: env.get(k) for k in changed}, "files": created})
    before_env, before_files = env, found
print("CHANGES " + json.dumps(changes))
"""


def probe(modules, tmp_path, environ=None):
    home = tmp_path / "home"
    home.mkdir(exist_ok=True)
    env = {k: v for k, v in (environ or os.environ).items() if k not in ("TF_XLA_FLAGS", "VTN_XLA_WORKSPACE")}
    env.update(HOME=str(home), PYTHONPATH=os.pathsep.join([str(REPO), env.get("PYTHONPATH", "")]),
               XDG_CACHE_HOME=str(home / ".cache"), MPLCONFIGDIR=str(home / ".matplotlib"))
    result = subprocess.run([sys.executable, "-c", PROBE, *modules], cwd=tmp_path, env=env, capture_output=True,
                            text=True, timeout=900)
    assert result.returncode == 0, result.stderr[-3000:]
    line = next(line for line in result.stdout.splitlines() if line.startswith("CHANGES "))
    return json.loads(line[len("CHANGES "):])


def allowed(change, user_set_onednn):
    environment = dict(change["environment"])
    if not user_set_onednn and environment.get(ONEDNN) == "1":
        environment.pop(ONEDNN)
    return not environment and not change["files"]


LIBRARY = sorted(name for name in MODULES if not name.startswith("vtn_tf.cli."))
COMMANDS = sorted(name for name in MODULES if name.startswith("vtn_tf.cli.") and name != "vtn_tf.cli")


def test_importing_the_library_changes_no_environment_and_creates_no_file(tmp_path):
    environ = {k: v for k, v in os.environ.items() if k != ONEDNN}
    changes = probe(LIBRARY, tmp_path, environ)
    assert all(allowed(change, False) for change in changes), changes


@pytest.mark.parametrize("command", COMMANDS)
def test_importing_a_command_changes_no_environment_and_creates_no_file(command, tmp_path):
    """Each command's module alone (their flags are defined at import, one set per process)."""
    changes = probe([command], tmp_path)
    assert all(allowed(change, ONEDNN in os.environ) for change in changes), changes


def test_the_onednn_switch_is_set_before_tensorflow_loads_and_never_over_the_users_choice(tmp_path):
    script = ("import os, sys; import vtn_tf; "
              "print(os.environ.get('TF_ENABLE_ONEDNN_OPTS'), 'tensorflow' in sys.modules)")
    env = {k: v for k, v in os.environ.items() if k != ONEDNN}
    env["PYTHONPATH"] = os.pathsep.join([str(REPO), env.get("PYTHONPATH", "")])
    unset = subprocess.run([sys.executable, "-c", script], env=env, capture_output=True, text=True, timeout=300)
    chosen = subprocess.run([sys.executable, "-c", script], env={**env, ONEDNN: "0"}, capture_output=True, text=True,
                            timeout=300)
    assert unset.stdout.split() == ["1", "False"], unset.stderr[-2000:]
    assert chosen.stdout.split() == ["0", "False"], chosen.stderr[-2000:]


@pytest.mark.parametrize("command", COMMANDS)
def test_a_command_loads_tensorflow_only_after_its_main_starts(command):
    """The commands set up TensorFlow's compiled-kernel cache in ``main``
    (`vtn_tf.cli.compile_cache`), and TensorFlow reads that setting when it loads: a command
    module that loaded TensorFlow on import would leave the cache off."""
    script = f"import sys, {command}; print('tensorflow' in sys.modules, 'keras' in sys.modules)"
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")])}
    result = subprocess.run([sys.executable, "-c", script], env=env, capture_output=True, text=True, timeout=300)
    assert result.stdout.split() == ["False", "False"], result.stderr[-2000:]
