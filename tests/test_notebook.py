"""experiments/notebooks/quickstart.ipynb: runs top to bottom on CPU and shows what it says it
shows (the routing table, naive and absorbed MLA agreeing, generated text, the HF round trip).

The notebook is committed with its outputs, so that GitHub shows them; the second test keeps it
that way (every code cell executed, in order, without errors).

The run's wall time is printed (`pytest -s` shows it), not asserted.
"""

import json
import os
import re
import sys
import time

import nbformat
from jupyter_client.kernelspec import KernelSpecManager
from jupyter_client.manager import KernelManager
from nbclient import NotebookClient

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
NOTEBOOK = os.path.join(ROOT, "experiments", "notebooks", "quickstart.ipynb")
CELL_TIMEOUT_S = 300


def _code_cells(nb):
  return [c for c in nb.cells if c.cell_type == "code"]


def _printed(nb) -> str:
  """Everything the code cells printed or displayed as text, in order."""
  parts = []
  for cell in _code_cells(nb):
    for out in cell.outputs:
      if out.output_type == "stream":
        parts.append(out.text)
      elif out.output_type in ("execute_result", "display_data"):
        parts.append(out.get("data", {}).get("text/plain", "") + "\n")
  return "".join(parts)


def _number(pattern: str, text: str) -> float:
  match = re.search(pattern, text, re.M)
  assert match, f"no line matching {pattern!r} in the notebook's output"
  return float(match.group(1))


def _this_python_kernel(tmp_path) -> KernelManager:
  """A "python3" kernel on this interpreter, whatever other python3 kernelspecs the machine has."""
  spec_dir = tmp_path / "kernels" / "python3"
  spec_dir.mkdir(parents=True)
  spec = {
    "argv": [sys.executable, "-m", "ipykernel_launcher", "-f", "{connection_file}"],
    "display_name": "Python 3",
    "language": "python",
  }
  (spec_dir / "kernel.json").write_text(json.dumps(spec))
  specs = KernelSpecManager(kernel_dirs=[str(tmp_path / "kernels")])
  return KernelManager(kernel_name="python3", kernel_spec_manager=specs)


def test_quickstart_notebook_runs_top_to_bottom(tmp_path, monkeypatch):
  monkeypatch.setenv("JAX_PLATFORMS", "cpu")
  nb = nbformat.read(NOTEBOOK, as_version=4)
  cwd = tmp_path / "cwd"
  cwd.mkdir()
  client = NotebookClient(
    nb,
    km=_this_python_kernel(tmp_path),
    timeout=CELL_TIMEOUT_S,
    resources={"metadata": {"path": str(cwd)}},
  )
  started = time.perf_counter()
  # A failing cell (its asserts included) raises CellExecutionError, naming it. cleanup_kc: shut
  # the kernel down, also on failure (nbclient leaves alone a kernel manager it was handed).
  client.execute(cleanup_kc=True)
  print(f"\nquickstart.ipynb executed in {time.perf_counter() - started:.1f} s")

  printed = _printed(nb)
  assert re.search(r"^routing table", printed, re.M), printed
  assert re.search(r"^generated: ", printed, re.M), printed
  assert _number(r"^max \|absorbed - naive\| logits: (\S+)$", printed) < 1e-4
  assert _number(r"^max \|absorbed - full forward\| logits: (\S+)$", printed) < 1e-4
  assert _number(r"^max \|logits after the HF round trip - before\|: (\S+)$", printed) == 0.0
  assert list(cwd.iterdir()) == [], "the notebook wrote into its working directory"


def test_committed_notebook_keeps_its_outputs():
  nb = nbformat.read(NOTEBOOK, as_version=4)
  nbformat.validate(nb)
  assert nb.metadata.kernelspec.name == "python3"
  cells = _code_cells(nb)
  # Executed in one pass, top to bottom (re-run it and save, after editing a cell).
  assert [c.execution_count for c in cells] == list(range(1, len(cells) + 1))
  errors = [o for c in cells for o in c.outputs if o.output_type == "error"]
  assert not errors, errors[0].get("evalue")
  printed = _printed(nb)
  assert re.search(r"^routing table", printed, re.M) and re.search(r"^generated: ", printed, re.M)
  # Text and one small figure, not megabytes of HTML.
  assert os.path.getsize(NOTEBOOK) < 200_000
