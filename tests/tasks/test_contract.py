"""The task contract (`fdjax.tasks.TaskModule`): every task module conforms, and a module that
lacks a required hook or has a hook of the wrong signature is rejected by name."""

import glob
import importlib.util
import os
import pkgutil
import sys
import types

import pytest

import fdjax.tasks
from fdjax import explain
from fdjax.tasks import (
  BATCH_DIM,
  HOOKS,
  MissingHookError,
  Task,
  check_task,
  expected_signature,
  load_task,
  resolve_task,
)

TESTS = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
# Every task module of the package (private `_*.py` modules hold a family's shared pieces).
PACKAGE_TASKS = sorted(
  name for _, name, _ in pkgutil.iter_modules(fdjax.tasks.__path__) if not name.startswith("_")
)
# The test tasks: every tests/**/*task.py (tinytask, probetask, ...) and the new family's task.
TEST_TASKS = sorted(glob.glob(os.path.join(TESTS, "**", "*task.py"), recursive=True)) + [
  os.path.join(TESTS, "newfamily", "inbetween.py")
]


def _import_path(path: str) -> types.ModuleType:
  # A name of its own (tests/launch/probetask.py is no `launch.` module), registered while it
  # executes, as dataclasses in the module need it to be.
  name = "contract_test_" + os.path.splitext(os.path.basename(path))[0]
  spec = importlib.util.spec_from_file_location(name, path)
  module = importlib.util.module_from_spec(spec)
  sys.modules[name] = module
  spec.loader.exec_module(module)
  return module


def test_every_task_is_found():
  assert {"audio2mesh", "dfer", "au"} <= set(PACKAGE_TASKS)
  names = {os.path.basename(p) for p in TEST_TASKS}
  assert {"tinytask.py", "probetask.py", "bntask.py", "gantask.py", "inbetween.py"} <= names


@pytest.mark.parametrize("name", PACKAGE_TASKS)
def test_package_task_conforms(name):
  module = importlib.import_module(f"fdjax.tasks.{name}")
  assert check_task(module) == []
  task = load_task(name)
  assert task.module is module and task.name == name


@pytest.mark.parametrize("path", TEST_TASKS, ids=os.path.basename)
def test_test_task_conforms(path):
  module = _import_path(path)
  assert check_task(module) == []
  resolve_task(module)


def _module(name: str, **hooks) -> types.ModuleType:
  module = types.ModuleType(name)
  base = {
    "build_model": lambda config: None,
    "dummy_batch": lambda config, batch_size: {},
    "train_data": lambda config, *, process_index, process_count: None,
    "loss_fn": lambda model, params, batch, rng, train: (0.0, {}),
  }
  for hook, fn in {**base, **hooks}.items():
    if fn is not None:
      setattr(module, hook, fn)
  return module


def test_a_task_missing_dummy_batch_fails_naming_module_hook_and_signature():
  module = _module("fake_no_dummy", dummy_batch=None)
  assert check_task(module) == ["fake_no_dummy lacks dummy_batch(config, batch_size)"]
  with pytest.raises(
    AttributeError, match=r"fake_no_dummy lacks dummy_batch\(config, batch_size\)"
  ):
    resolve_task(module)


def test_a_task_without_any_loss_fails():
  module = _module("fake_no_loss", loss_fn=None)
  (problem,) = check_task(module)
  assert problem.startswith("fake_no_loss lacks loss_fn(model, params, batch, rng, train, *,")
  assert "(or make_loss_fn(config))" in problem


def test_a_loss_fn_of_the_wrong_signature_fails():
  module = _module("fake_bad_loss", loss_fn=lambda model, params, batch, train: (0.0, {}))
  (problem,) = check_task(module)
  assert problem == (
    "fake_bad_loss.loss_fn names positional parameter 4 'train', expected 'rng'; expected "
    "loss_fn(model, params, batch, rng, train, *, collections=None)"
  )
  with pytest.raises(TypeError, match="fake_bad_loss.loss_fn names positional parameter 4"):
    resolve_task(module)


def test_an_optional_hook_of_the_wrong_signature_fails():
  def evaluate(config, model, params, mesh, rules, workdir, step):  # no `*`
    return {}

  module = _module("fake_bad_eval", evaluate=evaluate)
  (problem,) = check_task(module)
  assert problem == (
    "fake_bad_eval.evaluate takes 'mesh' positionally: it must be keyword-only (after `*`); "
    "expected evaluate(config, model, params, *, mesh, rules, workdir, step, collections=None)"
  )
  with pytest.raises(TypeError, match="fake_bad_eval.evaluate"):
    resolve_task(module)
  module = _module("fake_bad_predict", predict_fn=lambda config: None)
  assert check_task(module) == [
    "fake_bad_predict.predict_fn lacks positional parameter 2 'model'; expected "
    "predict_fn(config, model)"
  ]
  module = _module("fake_extra", export_dims=lambda config, views: [])
  assert check_task(module) == [
    "fake_extra.export_dims has parameter 'views', which the contract does not pass (give it a "
    "default); expected export_dims(config)"
  ]


def test_signatures_the_contract_allows():
  def loss_fn(model, params, batch, rng, train, collections):  # a task with collections
    return 0.0, {}

  def evaluate(config, model, params, **kwargs):
    return {}

  def saliency_fn(config, model, params, example, *, method, target, scale=1.0):
    return {}

  module = _module("fake_ok", loss_fn=loss_fn, evaluate=evaluate, saliency_fn=saliency_fn)
  assert check_task(module) == []


def test_resolved_task_has_one_attribute_per_hook_and_explicit_defaults():
  fields = {f.name for f in Task.__dataclass_fields__.values()} - {"name", "module", "defined"}
  assert fields == set(HOOKS)
  module = _module("fake_minimal")
  task = resolve_task(module, "minimal")
  assert task.has("loss_fn") and not task.has("make_loss_fn") and not task.has("evaluate")
  assert task.make_loss_fn(None) is module.loss_fn
  assert task.export_dims(None) == (BATCH_DIM,) and task.export_metadata(None) == {}
  assert task.export_defaults(None) == {} and task.symbolic_constraints(None) == []
  assert task.stream_fn(None, None) is None and task.load_pretrained(None, {"w": 1}) == {"w": 1}
  with pytest.raises(MissingHookError, match="task 'minimal' defines no predict_fn, so it cannot"):
    task.predict_fn(None, None)
  with pytest.raises(MissingHookError, match="task 'minimal' defines no evaluate"):
    task.evaluate(None, None, None, mesh=None, rules=None, workdir="", step=0)
  with pytest.raises(ValueError, match="'predict' is not a task hook"):
    task.has("predict")


def test_every_hook_has_a_signature_and_a_docstring():
  for hook in HOOKS:
    assert getattr(fdjax.tasks.TaskModule, hook).__doc__, hook
    assert list(expected_signature(hook).parameters)[0] in ("config", "model"), hook


def test_explain_names_a_task_without_saliency_hooks(tmp_path, capsys):
  from helpers import TINY

  argv = ["--config", TINY, "--workdir", str(tmp_path), "--out", str(tmp_path / "x.png")]
  assert explain.main(argv) == 1
  assert (
    "fdjax explain: task 'tinytask' defines no explain_example or saliency_fn (the saliency "
    "hooks), so fdjax explain cannot explain it" in capsys.readouterr().err
  )
