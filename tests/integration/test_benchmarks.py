"""The GPU benchmark's CPU dry run: the script a lent device will run works before one is lent."""

import os
import subprocess
import sys

from tests.helpers import REPO


def test_gpu_bench_dry_run_prints_eager_compiled_and_document_rows_for_every_model():
    proc = subprocess.run(
        [sys.executable, "-m", "bench.gpu_bench", "--dry-run"],
        cwd=REPO,
        env={**os.environ, "DS_ACCELERATOR": "cpu", "OMP_NUM_THREADS": "2", "PYTHONPATH": str(REPO)},
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    rows = [line.split("|")[1:-1] for line in proc.stdout.splitlines() if line.startswith("| ") and "---" not in line]
    table = {(cells[0].strip(), cells[1].strip()): cells for cells in rows[1:]}
    modes = ("eager", "compiled", "eager, document attention")
    assert set(table) == {(m, mode) for m in ("gpt2-tiny", "llama-tiny", "qwen3-moe-tiny") for mode in modes}
    assert all(float(cells[3].replace(",", "")) > 0 for cells in table.values())  # tokens/s
