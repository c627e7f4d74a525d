"""`benchmarks/probe_sweep.py` on the real embedded digits, with a tiny encoder."""

import torch
from conftest import tiny_config

from benchmarks import probe_sweep
from modeling_ijepa import IJepaModel


def test_sweep_random_init_is_the_seeded_network(tmp_path, capsys):
    """
    A "pre-trained" folder that holds the network random init builds under the same seed must score exactly like its
    random-init counterpart (margin +0.0, spread 0.0); a folder built under another seed must not.
    """
    config = tiny_config()
    for seed in (3, 4):
        torch.manual_seed(seed)
        IJepaModel(config).save_pretrained(tmp_path / f"seed{seed}")

    assert probe_sweep.main(["--pretrained", str(tmp_path / "seed3"), "--seeds", "3", "--C", "1"]) == 0
    table = capsys.readouterr().out.strip().splitlines()[-1]
    cells = [cell.strip() for cell in table.strip("|").split("|")]
    assert cells[0] == "1" and cells[1] == cells[2] and cells[-3:-1] == ["+0.0", "0.0"], table
    assert 90.0 < float(cells[-1]) <= 100.0, table
    assert 10.0 < float(cells[1]) <= 100.0

    # Same seed for the random network, different saved network: the two rows now differ.
    probe_sweep.main(["--pretrained", str(tmp_path / "seed4"), "--seeds", "3", "--C", "1"])
    cells = [cell.strip() for cell in capsys.readouterr().out.strip().splitlines()[-1].strip("|").split("|")]
    assert cells[1] != cells[2]
