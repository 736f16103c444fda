"""Progress output: bars on a terminal, plain periodic lines in logs."""

from __future__ import annotations

import io

from ue_datasets.progress import LineProgress, progress_bar

from conftest import make_samples, write_shard


class _Terminal(io.StringIO):
    def isatty(self) -> bool:
        return True


def test_a_log_gets_plain_lines_without_escape_codes_or_carriage_returns():
    log = io.StringIO()
    with progress_bar(total=4, desc="protect", unit="file", stream=log, interval=0) as bar:
        for _ in range(4):
            bar.update(1)
            bar.set_postfix(loss="0.5")
    lines = log.getvalue().splitlines()
    assert lines[0].startswith("protect: 1/4 file (25%)") and "[loss=0.5]" in lines[1]
    assert lines[-1].startswith("protect: 4/4 file (100%) in ")
    assert "\r" not in log.getvalue() and "\x1b" not in log.getvalue()


def test_lines_come_at_most_once_per_interval_and_once_at_the_end():
    log = io.StringIO()
    bar = progress_bar(range(1000), desc="samples", stream=log, interval=3600)
    assert sum(1 for _ in bar) == 1000
    assert log.getvalue().splitlines() == [log.getvalue().splitlines()[-1]]
    assert log.getvalue().startswith("samples: 1000/1000 it (100%) in ")


def test_a_terminal_gets_a_tqdm_bar_and_disable_prints_nothing():
    from tqdm.auto import tqdm

    assert isinstance(progress_bar(total=1, stream=_Terminal()), tqdm)
    log = io.StringIO()
    with progress_bar(total=3, disable=True, stream=log) as bar:
        bar.update(3)
    assert log.getvalue() == ""


def test_nested_bars_that_do_not_leave_stay_quiet_at_the_end():
    log = io.StringIO()
    with LineProgress(desc="samples", stream=log, interval=3600, leave=False) as bar:
        bar.update(5)
    assert log.getvalue() == ""


def test_the_interval_comes_from_the_environment(monkeypatch):
    monkeypatch.setenv("UE_DATASETS_PROGRESS_SECONDS", "7")
    assert LineProgress().interval == 7.0


def test_protect_logs_plain_progress_when_stderr_is_not_a_terminal(tmp_path, prot, capfd):
    from ue_datasets.cli import main

    src = write_shard(str(tmp_path / "in" / "a.tar"), make_samples(3))
    assert main(["protect", "--protection", prot, "--input", src, "--output", str(tmp_path / "out"),
                 "--device", "cpu"]) == 0
    err = capfd.readouterr().err
    assert "protect: 1/1 file (100%) in " in err and "\r" not in err and "\x1b" not in err


def test_rates_read_as_plain_numbers():
    bar = LineProgress(total=10_000, desc="samples", unit="img", stream=io.StringIO(), interval=3600)
    bar.n, bar._start = 5000, bar._start - 4.0
    assert "1250 img/s" in bar._line(bar._start + 4.0, final=False)
