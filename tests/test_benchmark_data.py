"""Smoke test of benchmarks/benchmark_data.py: every pipeline runs on a few generated JPEGs and gets a rate."""

from benchmarks import benchmark_data


def test_data_benchmark_times_every_pipeline_and_prints_the_tables(capsys):
    results = benchmark_data.main(["--quick", "--workers", "1"])
    output = capsys.readouterr().out
    assert set(results["rates"]) == {
        "today's collator (PIL, image processor)",
        "authors' pipeline (restated)",
        "ours, float32 out",
        "ours, uint8 out",
        "ours, uint8 out, full-size decode",
        "ours, uint8 out, streamed parquet",
        "decode floor, PIL",
        "decode floor, libjpeg-turbo (ours)",
    }
    assert all(rate > 0 for rates in results["rates"].values() for rate in rates)
    assert set(results["wall_rates"]) == set(results["rates"])
    for key in ("worker_rates", "worker_cores"):
        values = [value for by_workers in results[key].values() for runs in by_workers.values() for value in runs]
        assert values and all(value > 0 for value in values)
    lines = ("| path (one process, one core)", "its decode floor", "| DataLoader |", "cores its workers got")
    for line in lines + ("CPU cores to feed one GPU",):
        assert line in output


def test_generated_jpegs_are_distinct_and_sharded(tmp_path):
    paths = benchmark_data.make_jpegs(tmp_path / "images", 6, width=64, height=48)
    assert len({path.read_bytes() for path in paths}) == 6
    files = benchmark_data.list_image_files(tmp_path / "images")
    assert [label for _, label in files] == sorted(label for _, label in files) and len(files) == 6
    benchmark_data.write_parquet_shards(paths, tmp_path / "parquet", num_shards=3)
    assert len(list((tmp_path / "parquet").glob("*.parquet"))) == 3
