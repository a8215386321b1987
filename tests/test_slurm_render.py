"""`kiln slurm render`: slurm/kiln.sbatch with a cluster's #SBATCH settings and a run filled in,
the rest of the script unchanged (one source), accepted by bash, and bad requests refused with
the setting named."""

from __future__ import annotations

import subprocess

import pytest

from kiln.cli import main
from kiln.errors import KilnConfigError
from kiln.slurm import TEMPLATE, render
from tests.kiln_run import REPO, TINY

SBATCH = REPO / "slurm" / "kiln.sbatch"


def sbatch_lines(script: str) -> list[str]:
    return [line for line in script.splitlines() if line.startswith("#SBATCH")]


def changed_lines(script: str) -> list[tuple[str, str]]:
    """(template line, rendered line) for each body line that differs; #SBATCH lines left out."""
    body = [line for line in script.splitlines() if not line.startswith("#SBATCH")]
    template = [line for line in SBATCH.read_text().splitlines() if not line.startswith("#SBATCH")]
    assert len(body) == len(template)
    return [(old, new) for old, new in zip(template, body) if old != new]


def bash_array(script: str, name: str) -> list[str]:
    """The bash array ``name`` as bash reads it from the script's assignment line."""
    line = next(line for line in script.splitlines() if line.startswith(f"{name}=("))
    result = subprocess.run(["bash", "-c", f'{line}\nprintf "%s\\0" "${{{name}[@]}}"'], capture_output=True,
                            text=True, check=True)
    return result.stdout.split("\0")[:-1]


def test_the_template_is_the_shipped_script():
    assert TEMPLATE.resolve() == SBATCH.resolve()


def test_gpu_cluster_file(tmp_path):
    script = render("configs/llama3-8b.yaml", ["parallel.tp=4", "optim.lr=3e-4"], nodes=2, gpus_per_node=4,
                    partition="gpu", account="proj", time="12:00:00", job_name="l8b")
    assert sbatch_lines(script) == [
        "#SBATCH --job-name=l8b",
        "#SBATCH --nodes=2",
        "#SBATCH --ntasks-per-node=1",
        "#SBATCH --gpus-per-node=4",
        "#SBATCH --exclusive",
        "#SBATCH --time=12:00:00",
        "#SBATCH --signal=USR1@300",
        "#SBATCH --requeue",
        "#SBATCH --open-mode=append",
        "#SBATCH --output=slurm-%x-%j.out",
        "#SBATCH --partition=gpu",
        "#SBATCH --account=proj",
    ]
    assert changed_lines(script) == [("run=()", "run=(configs/llama3-8b.yaml parallel.tp=4 optim.lr=3e-4)")]
    path = tmp_path / "l8b.sbatch"
    path.write_text(script)
    subprocess.run(["bash", "-n", str(path)], check=True)


def test_cpu_cluster_file_asks_for_no_gpus_and_sets_the_workers():
    script = render(TINY, ["train.max_steps=5"], gpus_per_node=0, workers_per_node=2, time="30")
    lines = sbatch_lines(script)
    assert [line for line in lines if "gpus" in line] == ["#SBATCH --gpus-per-node=0"]
    assert "#SBATCH --time=30" in lines and "#SBATCH --nodes=1" in lines and "#SBATCH --job-name=kiln" in lines
    assert changed_lines(script) == [("run=()", f"run=({TINY} train.max_steps=5)"),
                                     ("cpu_workers_per_node=1", "cpu_workers_per_node=2")]


def test_the_run_is_quoted_for_bash():
    overrides = ["train.run_dir=runs/with space", "logging.wandb_entity=it's"]
    assert bash_array(render(TINY, overrides, gpus_per_node=0), "run") == [TINY, *overrides]


@pytest.mark.parametrize("kwargs, message", [
    (dict(gpus_per_node=4, workers_per_node=2), "--workers-per-node is for --gpus-per-node 0"),
    (dict(gpus_per_node=0, workers_per_node=0), "--workers-per-node 0"),
    (dict(nodes=0), "--nodes 0"),
    (dict(gpus_per_node=-1), "--gpus-per-node -1"),
    (dict(gpus_per_node=0, time="1h"), "--time '1h' is not a Slurm time"),
    (dict(gpus_per_node=0, partition="a b"), "--partition 'a b'"),
    # tiny's global batch of 16 cannot be split over 8 GPUs × micro-batch 4: refused before the queue
    (dict(), "is not divisible by train.micro_batch_size(4) × dp(8)"),
])
def test_bad_requests_name_the_setting(kwargs, message):
    with pytest.raises(KilnConfigError) as err:
        render(TINY, [], **kwargs)
    assert message in str(err.value)


def test_cli_writes_an_executable_file(tmp_path, capsys):
    out = tmp_path / "tiny.sbatch"
    code = main(["slurm", "render", "--gpus-per-node", "0", TINY, "--workers-per-node", "2", "train.max_steps=5",
                 "-o", str(out)])
    assert code == 0 and out.stat().st_mode & 0o111
    assert out.read_text() == render(TINY, ["train.max_steps=5"], gpus_per_node=0, workers_per_node=2)
    assert f"sbatch {out}" in capsys.readouterr().err


def test_cli_refuses_a_bad_override(capsys):
    assert main(["slurm", "render", "--gpus-per-node", "0", TINY, "optim.lrr=1"]) == 2
    assert "did you mean 'optim.lr'" in capsys.readouterr().err
