"""Launch configs (``--config=experiments/configs/x.py``, ``lib.launch_config``): every config
file sets only its launcher's flags, to exactly the values of the command it replaced; the
command line wins; a bad value fails as on the command line; the docs cite existing configs and
no long flag lines.

Launchers are never imported here (``test_no_launcher_imports``): one subprocess imports each
launcher in turn, parses every case's argv with absl and applies the config, and reports the
flag values or the error.
"""

import ast
import importlib.util
import json
import pathlib
import re
import subprocess
import sys

import pytest

ROOT = pathlib.Path(__file__).resolve().parent.parent
CONFIGS = sorted((ROOT / "experiments" / "configs").glob("*.py"))
_CFG = "experiments/configs/"

# Each config (with overrides) beside the command line it replaced in docs/results.md or the
# README: both must give every flag of the launcher the same value.
EQUIVALENT = [
    ("niah_n100.py", [], "--method=kvzip,kvzip_heads,tova --lengths=1024 --num_samples=100"),
    ("niah_n100.py", ["--config.lengths=2048"],
     "--method=kvzip,kvzip_heads,tova --lengths=2048 --num_samples=100"),
    ("niah_n100_prefill.py", [],
     "--method=snapkv,streaming_llm,knorm,tova,h2o,pyramidkv,adakv,expected_attention,keyformer"
     " --lengths=1024 --num_samples=100 --out=results/eval_niah_1k_n100.jsonl"),
    ("niah_n100_prefill.py",
     ["--config.lengths=4096", "--config.out=results/eval_niah_4k_n100.jsonl"],
     "--method=snapkv,streaming_llm,knorm,tova,h2o,pyramidkv,adakv,expected_attention,keyformer"
     " --lengths=4096 --num_samples=100 --out=results/eval_niah_4k_n100.jsonl"),
    ("niah_1k_n100_adakv_scorers.py", [],
     "--method=adakv:scorer=tova,adakv:scorer=tova:alpha=1.0,adakv:scorer=h2o,adakv:scorer=knorm,"
     "adakv:scorer=expected_attention --ratio=0.25,0.5 --lengths=1024 --num_samples=100 "
     "--out=results/eval_niah_1k_n100_adakv_scorers.jsonl"),
    ("niah_n100_kvzip.py", [],
     "--method=kvzip,kvzip:share=layer --ratio=0.25,0.5,0.75 --lengths=1024,2048,4096 "
     "--num_samples=100 --out=results/eval_niah_n100_kvzip.jsonl"),
    ("niah_n100_kvzip_heads.py", [],
     "--method=kvzip_heads --ratio=0.25,0.5,0.75 --lengths=1024,2048,4096 --num_samples=100 "
     "--out=results/eval_niah_n100_kvzip_heads.jsonl"),
    ("niah_multikey_docs_2k.py", [],
     "--method=kvzip_heads,kvzip,tova --ratio=0.25,0.5 --task=niah_multikey --haystack=docs "
     "--lengths=2048 --num_samples=30 --out=results/eval_niah_multikey_docs_2k_kvzip_heads.jsonl"),
    ("ppl_2k.py", [],
     "--task=perplexity --method=kivi,kivi4,snapkv+kivi,kvquant2,kvquant,kvquant4,xkv,think,"
     "minicache,minicache:start=0,matryoshka_pca,matryoshka,matryoshka:searched=true --ratio=1.0"
     " --lengths=2048 --num_samples=20 --continuation=256 --out=results/eval_kivi_ppl_2k.jsonl"),
    ("quant_niah_1k.py", [],
     "--method=kivi,kivi4 --ratio=1.0 --lengths=1024 --num_samples=20 "
     "--out=results/eval_kivi_niah_1k.jsonl"),
    ("quant_niah_1k.py", ["--config.method=kvquant2,kvquant,kvquant4"],
     "--method=kvquant2,kvquant,kvquant4 --ratio=1.0 --lengths=1024 --num_samples=20 "
     "--out=results/eval_kivi_niah_1k.jsonl"),
    ("online_niah_n100.py", [],
     "--method=knorm,snapkv,h2o,tova,expected_attention --ratio=0.25 --lengths=2048 "
     "--num_samples=100 --compress_during_prefill --out=results/eval_online_niah_2k.jsonl"),
    ("online_niah_n100.py",
     ["--config.lengths=8080", "--config.out=results/eval_online_niah_8k.jsonl"],
     "--method=knorm,snapkv,h2o,tova,expected_attention --ratio=0.25 --lengths=8080 "
     "--num_samples=100 --compress_during_prefill --out=results/eval_online_niah_8k.jsonl"),
    ("online_quant8_niah_2k.py", [],
     "--method=tova+kivi,knorm+kivi --ratio=0.5 --lengths=2048 --num_samples=100 "
     "--compress_during_prefill --quantize_each_chunk "
     "--out=results/eval_online_quant8_niah_2k.jsonl"),
    ("vs_kvpress_cpu.py", [],
     "--methods=snapkv,knorm --lengths=1024,2048 --ratio=0.5 --cases=5 --new_tokens=32 "
     "--out=results/bench_vs_kvpress_prefill_rows_cpu.json"),
    ("vs_kvpress_cpu.py",
     ["--config.methods=kvzip", "--config.out=results/bench_vs_kvpress_kvzip_cpu.json"],
     "--methods=kvzip --lengths=1024,2048 --ratio=0.5 --cases=5 --new_tokens=32 "
     "--out=results/bench_vs_kvpress_kvzip_cpu.json"),
    ("vs_kvpress_twin_h200.py", [],
     "--model=.devcarry/smollm2-twin --methods=snapkv,knorm --lengths=1024,4096 --cases=3 "
     "--dtype=bfloat16"),
    ("bench_compress_cpu.py", [],
     "--method=snapkv,pyramidkv,adakv,h2o,tova,knorm,streaming_llm,expected_attention,keyformer,"
     "kivi --length=4096 --reps=3"),
    ("bench_compress_kvzip_heads_cpu.py", [],
     "--method=kvzip_heads,kvzip,tova,knorm --length=4096 --reps=3 "
     "--out=results/bench_compress_kvzip_heads_cpu.json"),
    ("bench_compress_h2o_keyformer_cpu.py", [],
     "--method=h2o,keyformer --length=4096 --reps=2 "
     "--out=results/bench_compress_h2o_keyformer_maskbias_cpu.json"),
    ("bench_compress_twin_h200.py", [],
     "--model=.devcarry/smollm2-twin --method=h2o,keyformer,tova,snapkv,pyramidkv,adakv,knorm,"
     "streaming_llm,expected_attention --length=4096 --reps=10 --dtype=bfloat16 "
     "--column_sums=kernel"),
    ("bench_decode_splitk_h200.py", [],
     "--lengths=1024,4096,32768 --reps=10 --kernel_partitions=auto,1 "
     "--kernel_dot_dtypes=float32,bfloat16"),
    ("report_niah_n100_all.py", [],
     "--inputs=results/eval_niah_1k_n100.jsonl,results/eval_niah_2k_n100.jsonl,"
     "results/eval_niah_4k_n100.jsonl,results/eval_niah_n100_kvzip.jsonl,"
     "results/eval_niah_n100_kvzip_heads.jsonl --out_dir=results/report_niah_n100_all"),
    ("kv_heads_smollm2.py", [],
     "--kv_heads=1 --num_samples=4 --seqlen=512 --eval_samples=4 --eval_tokens=512 "
     "--out=results/kv_heads_smollm2.json"),
    ("online_memory_snapkv_kivi.py", [],
     "--length=8192 --ratio=0.25 --method=snapkv+kivi --limit_gib=0 "
     "--out=results/bench_online_memory_quant_cpu.json"),
    ("prefill_memory_snapkv_kivi.py", [],
     "--length=8191 --ratio=0.25 --method=snapkv+kivi --compress_during_prefill "
     "--quantize_each_chunk"),
    ("cpu_floors_weights.py", [],
     "--parts=weights --reps=9 --vs_kvpress=results/bench_vs_kvpress_prefill_rows_cpu.json "
     "--out=results/bench_cpu_floors_weights_layouts_cpu.json"),
    ("bench_compress_h2o_keyformer_cpu.py",
     ["--config.out=results/bench_compress_h2o_keyformer_empty_cpu.json"],
     "--method=h2o,keyformer --length=4096 --reps=2 "
     "--out=results/bench_compress_h2o_keyformer_empty_cpu.json"),
    ("bench_compress_h2o_keyformer_cpu.py",
     ["--config.method=keyformer", "--config.out=results/bench_compress_keyformer_cpu.json"],
     "--method=keyformer --length=4096 --reps=2 --out=results/bench_compress_keyformer_cpu.json"),
    ("vs_kvpress_cpu.py", ["--config.out=results/bench_vs_kvpress_keys_lhs_cpu.json"],
     "--methods=snapkv,knorm --lengths=1024,2048 --ratio=0.5 --cases=5 --new_tokens=32 "
     "--out=results/bench_vs_kvpress_keys_lhs_cpu.json"),
    ("vs_kvpress_cpu.py", ["--config.methods=snapkv,streaming_llm,knorm,expected_attention",
                           "--config.out=results/bench_vs_kvpress_unloaded_cpu.json"],
     "--methods=snapkv,streaming_llm,knorm,expected_attention --lengths=1024,2048 --ratio=0.5 "
     "--cases=5 --new_tokens=32 --out=results/bench_vs_kvpress_unloaded_cpu.json"),
    ("vs_kvpress_twin_h200.py", ["--config.model=<twin>"],
     "--model=<twin> --methods=snapkv,knorm --lengths=1024,4096 --cases=3 --dtype=bfloat16"),
    ("quant_niah_1k.py",
     ["--config.method=matryoshka,matryoshka:searched=true,matryoshka_pca,minicache,"
      "minicache:start=0"],
     "--method=matryoshka,matryoshka:searched=true,matryoshka_pca,minicache,minicache:start=0 "
     "--ratio=1.0 --lengths=1024 --num_samples=20 --out=results/eval_kivi_niah_1k.jsonl"),
    ("niah_n100_prefill.py",
     ["--config.lengths=2048", "--config.num_samples=2", "--config.out=/tmp/ab.jsonl"],
     "--method=snapkv,streaming_llm,knorm,tova,h2o,pyramidkv,adakv,expected_attention,keyformer"
     " --lengths=2048 --num_samples=2 --out=/tmp/ab.jsonl"),
    ("calibrate_kvzip_heads_smollm2.py", [],
     "--length=2048 --samples=4 --out=results/kvzip_heads/smollm2-135m.json"),
    ("calibrate_kvquant_smollm2.py", [], "--out=results/calibration/kvquant_smollm2-135m"),
]

# One process: each launcher imported once, every case of it parsed (``sys.argv`` too: config
# overrides are read from it) and its config applied; then the launcher's flags are deleted so
# that the next launcher defines its own.
_RUN = """
import importlib, json, sys
from absl import flags
from kvlab.lib import launch_config
FLAGS = flags.FLAGS
base = set(FLAGS)
out = {}
for module, cases in json.loads(sys.argv[1]).items():
  importlib.import_module(module)
  known = launch_config.launcher_flags()
  for key, argv in cases:
    for name in [n for n in FLAGS if n.startswith("config.")]:
      delattr(FLAGS, name)
    FLAGS.unparse_flags()
    sys.argv = [module] + argv
    try:
      FLAGS(sys.argv)
      applied = launch_config.apply_config()
      out[key] = {"values": {n: FLAGS[n].value for n in known}, "applied": sorted(applied),
                  "known": known}
    except flags.Error as e:
      out[key] = {"error": str(e), "known": known}
  for name in [n for n in FLAGS if n not in base]:
    delattr(FLAGS, name)
  sys.modules.pop(module, None)
print(json.dumps(out))
"""


def _load(path: pathlib.Path):
  spec = importlib.util.spec_from_file_location(f"_cfg_{path.stem}", path)
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module


def _launcher(name: str) -> str:
  return _load(ROOT / "experiments" / "configs" / name).LAUNCHER


def _write(tmp, name: str, body: str) -> str:
  path = tmp / name
  path.write_text("from ml_collections import config_dict\n\n\ndef get_config():\n"
                  "  c = config_dict.ConfigDict()\n" + body + "  return c\n")
  return str(path)


@pytest.fixture(scope="module")
def parsed(tmp_path_factory):
  """``{case key: {"values" | "error", "known", "applied"}}`` from one subprocess."""
  tmp = tmp_path_factory.mktemp("configs")
  ev = "experiments.evaluate"
  cases = {}

  def add(module, key, argv):
    cases.setdefault(module, []).append((key, argv))

  for path in CONFIGS:
    add(_load(path).LAUNCHER, f"load:{path.name}", [f"--config={_CFG}{path.name}"])
  for i, (name, over, cmd) in enumerate(EQUIVALENT):
    add(_launcher(name), f"cfg:{i}", [f"--config={_CFG}{name}"] + over)
    add(_launcher(name), f"cmd:{i}", cmd.split())
  typo = _write(tmp, "typo.py", "  c.lenghts = '2048'\n")
  add(ev, "typo", [f"--config={typo}"])
  add(ev, "cli_wins", [f"--config={_CFG}niah_n100.py", "--lengths=2048", "--num_samples=5",
                       "--config.num_samples=7"])
  bad = {"lengths": "'abc'", "ratio": "'1.5'", "num_samples": "0", "max_new_tokens": "'x'",
         "method": "'knorm,knorm'", "task": "'bogus'"}
  for flag, value in bad.items():
    path = _write(tmp, f"bad_{flag}.py", f"  c.{flag} = {value}\n")
    add(ev, f"bad_cfg:{flag}", [f"--config={path}"])
    add(ev, f"bad_cli:{flag}", [f"--{flag}={ast.literal_eval(value)}"])
  lists = _write(tmp, "lists.py", "  c.lengths = [1024, 2048]\n  c.ratio = [0.25, 0.5]\n"
                 "  c.method = ['snapkv', 'knorm+kivi']\n  c.compress_during_prefill = True\n"
                 "  c.depths = None\n")
  add(ev, "lists", [f"--config={lists}"])
  add(ev, "lists_cli", ["--lengths=1024,2048", "--ratio=0.25,0.5", "--method=snapkv,knorm+kivi",
                        "--compress_during_prefill"])
  add(ev, "list_to_scalar", ["--config=" + _write(tmp, "l2s.py", "  c.num_samples = [1, 2]\n")])
  nested = _write(tmp, "nested.py", "  c.lengths = config_dict.ConfigDict()\n")
  add(ev, "nested", [f"--config={nested}"])
  add(ev, "no_config", ["--lengths=2048"])
  for i, (_, cmd) in enumerate(c for c in _doc_commands() if "--config=" in c[1]):
    words = cmd.split()
    module = words[words.index("-m") + 1]
    add(module, f"doc:{i}:{cmd}", words[words.index("-m") + 2:])
  proc = subprocess.run([sys.executable, "-c", _RUN, json.dumps(cases)], cwd=ROOT,
                        capture_output=True, text=True, timeout=240)
  assert proc.returncode == 0, proc.stderr[-3000:]
  return json.loads(proc.stdout.strip().splitlines()[-1])


@pytest.mark.parametrize("path", CONFIGS, ids=lambda p: p.name)
def test_every_config_loads_and_sets_only_its_launchers_flags(parsed, path):
  module = _load(path)
  assert (ROOT / (module.LAUNCHER.replace(".", "/") + ".py")).exists(), module.LAUNCHER
  assert module.__doc__ and module.get_config.__doc__, "say what result it reproduces"
  got = parsed[f"load:{path.name}"]
  assert "error" not in got, got.get("error")
  fields = sorted(module.get_config().keys())
  assert set(fields) <= set(got["known"]) and got["applied"] == fields


@pytest.mark.parametrize("i", range(len(EQUIVALENT)),
                         ids=[f"{n}{''.join(o)}" for n, o, _ in EQUIVALENT])
def test_config_gives_the_flag_values_of_the_command_it_replaced(parsed, i):
  """Same flag values, so the same run identity and row config (evaluate builds both from
  FLAGS), the same benchmark settings."""
  cfg, cmd = parsed[f"cfg:{i}"], parsed[f"cmd:{i}"]
  assert "error" not in cfg and "error" not in cmd, (cfg.get("error"), cmd.get("error"))
  assert cfg["values"] == cmd["values"]


def test_an_unknown_field_names_it_and_lists_the_flags(parsed):
  err = parsed["typo"]["error"]
  assert "field 'lenghts' is not a flag of" in err and "typo.py" in err
  assert "lengths, max_new_tokens" in err and "num_samples" in err


def test_the_command_line_wins_over_the_config(parsed):
  v = parsed["cli_wins"]["values"]
  assert v["lengths"] == ["2048"] and v["num_samples"] == 5  # the flags given
  assert v["method"] == ["kvzip", "kvzip_heads", "tova"]  # the config's
  assert parsed["cli_wins"]["applied"] == ["method"]


@pytest.mark.parametrize("flag", ["lengths", "ratio", "num_samples", "max_new_tokens", "method",
                                  "task"])
def test_a_bad_value_fails_as_on_the_command_line(parsed, flag):
  from_cfg, from_cli = parsed[f"bad_cfg:{flag}"], parsed[f"bad_cli:{flag}"]
  assert from_cli.get("error") and from_cfg.get("error") == from_cli["error"], (from_cfg,
                                                                               from_cli)


def test_lists_work_as_python_lists_and_none_keeps_the_default(parsed):
  assert "error" not in parsed["lists"], parsed["lists"].get("error")
  assert parsed["lists"]["values"] == parsed["lists_cli"]["values"]
  assert "one value" in parsed["list_to_scalar"]["error"]
  assert "nested ConfigDict" in parsed["nested"]["error"]
  assert parsed["no_config"]["values"]["lengths"] == ["2048"]


def test_a_launcher_reports_a_bad_config_before_any_work(tmp_path):
  out = tmp_path / "rows.jsonl"
  typo = _write(tmp_path, "typo.py", "  c.lenghts = '2048'\n")
  proc = subprocess.run([sys.executable, "-m", "experiments.evaluate", f"--config={typo}",
                         "--model=/nonexistent/model-dir", f"--out={out}"], cwd=ROOT,
                        capture_output=True, text=True, timeout=120)
  assert proc.returncode == 1, proc.stderr[-2000:]
  assert "FATAL Flags parsing error" in proc.stderr and "'lenghts'" in proc.stderr
  assert "loading" not in proc.stderr and not out.exists()


def test_every_launcher_defines_and_applies_the_config():
  for path in sorted((ROOT / "experiments").glob("*.py")):
    text = path.read_text()
    if "app.run(main)" not in text:
      continue
    main = next(n for n in ast.parse(text).body
                if isinstance(n, ast.FunctionDef) and n.name == "main")
    first = [ast.unparse(s) for s in main.body[:2]]
    assert "launch_config.define()" in text, path.name
    assert "launch_config.apply()" in first, (path.name, first)


def _doc_commands():
  """Every inline-code span of the README and docs/results.md that runs a launcher, with its
  whitespace (line breaks inside the span) collapsed."""
  for name in ("README.md", "docs/results.md"):
    for span in re.findall(r"`([^`]+)`", (ROOT / name).read_text()):
      cmd = " ".join(span.split())
      if "python -m experiments." in cmd:
        yield name, cmd


def test_every_config_command_in_the_docs_parses(parsed):
  docs = {k: v for k, v in parsed.items() if k.startswith("doc:")}
  assert len(docs) >= 20
  bad = {k.split(":", 2)[2]: v["error"] for k, v in docs.items() if "error" in v}
  assert not bad, bad


def test_docs_cite_existing_configs():
  paths = [(doc.name, p) for doc in [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
           for p in re.findall(r"--config=([^\s`:]+)", doc.read_text())]
  assert paths, "no --config= in the docs"
  missing = [x for x in paths if not (ROOT / x[1]).is_file()]
  assert not missing, missing


def test_no_long_flag_line_in_the_docs():
  long = [(doc, len(cmd), cmd) for doc, cmd in _doc_commands()
          if len(cmd) > 120 and "--config=" not in cmd]
  assert not long, f"use a config file (experiments/configs/) for: {long}"
