import contextlib
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from filelock import FileLock

ROOT = Path(__file__).resolve().parents[1]

# `make test` runs the suite in pytest-xdist workers, one per core: each worker (and every CLI subprocess it starts)
# gets its share of the cores instead of all of them, so workers do not oversubscribe the machine
if os.environ.get("PYTEST_XDIST_WORKER_COUNT"):
    _threads = str(max(1, (os.cpu_count() or 1) // int(os.environ["PYTEST_XDIST_WORKER_COUNT"])))
    os.environ["OMP_NUM_THREADS"] = os.environ["MKL_NUM_THREADS"] = _threads
    import torch

    torch.set_num_threads(int(_threads))


def _shared(tmp_path_factory) -> Path:
    """A folder every xdist worker of this run sees (the session's own folder in a run without workers)."""
    base = tmp_path_factory.getbasetemp()
    return base.parent if os.environ.get("PYTEST_XDIST_WORKER") else base


@contextlib.contextmanager
def _built_once(tmp_path_factory, name: str, all_cores: bool = False):
    """(path, build?) for a session fixture the workers share: the first worker to get here builds it while the
    others wait for it (each used to build its own copy: the classifier alone took 40 s a worker). Built with the
    worker's threads, since tests compare their own training with tiny_run bit for bit, or with every core where no
    test recomputes it (the waiting worker's core is idle). Tests only read these."""
    import torch

    path = _shared(tmp_path_factory) / name
    done = path.with_name(f"{name}.done")  # a builder that failed half-way leaves no marker: the next one rebuilds
    with FileLock(f"{path}.lock"):
        build, threads = not done.exists(), torch.get_num_threads()
        if build and path.exists():
            shutil.rmtree(path)
        if all_cores:
            torch.set_num_threads(os.cpu_count() or 1)
        try:
            yield path, build
        finally:
            torch.set_num_threads(threads)
        done.touch()


def worker_cache(tmp_path_factory) -> Path:
    """LDMSCALE_CACHE of the tests: FLOP counts and reference statistics in a folder of this worker, never the
    user's home (not shared: another worker's statistics, computed with its threads, could replace this one's in the
    middle of a test that compares two evaluations exactly)."""
    return tmp_path_factory.getbasetemp() / "ldmscale-cache"


@pytest.fixture(autouse=True)
def _isolated_cache(tmp_path_factory, monkeypatch):
    cache = worker_cache(tmp_path_factory)
    monkeypatch.setenv("LDMSCALE_CACHE", str(cache))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("TRANSFORMERS_OFFLINE", "1")


def run_cli(*args, env=None, timeout=600, check=False, subprocess_=False, cwd=ROOT):
    """Run the ldmscale command as a user would: `python -m ldmscale ...` in a subprocess when `env` is given or
    subprocess_ is set, else the same entry point (cli.main.main) in this process, which spares each call the 3-5 s
    of importing torch and diffusers again (the environment is restored after it)."""
    if env is not None or subprocess_:
        full_env = dict(os.environ)
        full_env.update(env or {})
        proc = subprocess.run(
            [sys.executable, "-m", "ldmscale", *map(str, args)],
            capture_output=True,
            text=True,
            env=full_env,
            timeout=timeout,
            cwd=cwd,
        )
    else:
        proc = _in_process(list(map(str, args)), cwd)
    if check and proc.returncode != 0:
        raise AssertionError(f"ldmscale {' '.join(map(str, args))} failed ({proc.returncode}):\n{proc.stderr[-3000:]}")
    return proc


def printed_pipeline(proc):
    """Run the loading line `ldmscale export` printed, as a user pastes it (up to the call it shows for PixArt);
    the pipeline it loads."""
    line = proc.stdout.strip().splitlines()[-1].strip()
    namespace: dict = {}
    exec(line.split("; pipe(")[0], namespace)
    return namespace["pipe"]


def _in_process(argv: list[str], cwd: Path = ROOT) -> subprocess.CompletedProcess:
    import contextlib
    import io
    import traceback

    import torch

    from ldmscale.cli.main import main

    out, err, saved, threads = io.StringIO(), io.StringIO(), dict(os.environ), torch.get_num_threads()
    code = 0
    try:
        with contextlib.chdir(cwd), contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
            try:
                main(argv)
            except SystemExit as e:
                code = e.code if isinstance(e.code, int) else (0 if e.code is None else 1)
            except Exception:  # an uncaught error: a traceback and exit code 1, as the interpreter does
                traceback.print_exc(file=err)
                code = 1
    finally:
        os.environ.clear()
        os.environ.update(saved)
        torch.set_num_threads(threads)  # the worker's share of the cores, whatever the command chose
    return subprocess.CompletedProcess(["ldmscale", *argv], code, out.getvalue(), err.getvalue())


@pytest.fixture(scope="session")
def tiny_ae(tmp_path_factory):
    from fixtures import make_autoencoder

    with _built_once(tmp_path_factory, "ae") as (out, build):
        if build:
            make_autoencoder(out)
    return out


@pytest.fixture(scope="session")
def tiny_cache(tmp_path_factory, tiny_ae):
    """animal-mnist, the first 96 images of each split, 32px, minilm: what training tests train on."""
    from ldmscale.data.cache import prepare
    from ldmscale.data.config import PrepareConfig

    with _built_once(tmp_path_factory, "cache") as (out, build):
        if build:
            prepare(
                PrepareConfig(
                    source="animal-mnist",
                    autoencoder=str(tiny_ae),
                    text_encoder="minilm",
                    resolution=32,
                    shard_size=64,
                    limit=96,
                ),
                out,
                progress=False,
            )
    return out


def tiny_train_config(cache, **kw):
    from ldmscale.train.config import TrainConfig

    base = dict(
        data=str(cache),
        size="c8",
        images=48,
        batch_size=8,
        lr=1e-3,
        warmup_steps=2,
        log_every=1,
        checkpoint_every=24,
        keep=3,
    )
    base.update(kw)
    return TrainConfig(**base)


@pytest.fixture(scope="session")
def tiny_run(tmp_path_factory, tiny_cache):
    """A c8 model trained for 6 steps on the tiny cache (a run directory to sample, eval and export)."""
    from ldmscale.train.loop import train

    with _built_once(tmp_path_factory, "run") as (root, build):
        if build:
            train(tiny_train_config(tiny_cache), root / "c8", progress=False)
    return root / "c8"


@pytest.fixture(scope="session")
def tiny_classifier(tmp_path_factory):
    """The domain classifier, trained for two epochs at half width (real data, real features)."""
    from ldmscale.eval.classifier import train_classifier
    from ldmscale.eval.config import ClassifierConfig

    with _built_once(tmp_path_factory, "classifier", all_cores=True) as (out, build):
        if build:
            train_classifier(ClassifierConfig(width=16, feature_dim=32, epochs=2, batch_size=128), out, progress=False)
    return out


def resume_exactly(tmp_path, monkeypatch, fn, kill_at=1, steps=2, weights=("raw",), atol=1e-6):
    """Run fn(out) straight, then killed at optimizer step `kill_at` and resumed: the same final weights."""
    import torch

    import ldmscale.train.loop as train_mod
    from ldmscale import checkpoint

    fn(tmp_path / "straight")
    real = train_mod.batch_indices

    def dies(step, *a):
        if step == kill_at:
            raise KeyboardInterrupt
        return real(step, *a)

    monkeypatch.setattr(train_mod, "batch_indices", dies)
    with pytest.raises(KeyboardInterrupt):
        fn(tmp_path / "resumed")
    monkeypatch.setattr(train_mod, "batch_indices", real)
    assert checkpoint.latest(tmp_path / "resumed").name == f"step-{kill_at:06d}"
    fn(tmp_path / "resumed")
    assert checkpoint.latest(tmp_path / "resumed").name == f"step-{steps:06d}"
    for w in weights:
        a = checkpoint.load_weights(checkpoint.latest(tmp_path / "straight"), w)
        b = checkpoint.load_weights(checkpoint.latest(tmp_path / "resumed"), w)
        assert all(torch.allclose(a[k], b[k], atol=atol, rtol=0) for k in a), w
