"""`make faults`: inject each fault a real training run meets, many times at seeded random points,
and write the outcome table to RELIABILITY.md (never edited by hand).

    python scripts/faults.py [--trials 10] [--seed 0] [--only sigkill-step,nan] [--quick] [--out RELIABILITY.md]

A trial *survives* when it ends in the promised clean state: the right exit code and one line (no
traceback), metrics.json never "completed" for an unfinished run, the damaged file named or the
cache rebuilt, and, where the run can continue, `resume` ending equal to an uninterrupted run of
the same seed (loss to 1e-5, the same tokens). *Steps lost* is the training that had to be redone
(progress when the fault hit minus the step resumed from); *data lost* counts trials where anything
beyond those steps was gone or wrong (a checkpoint, a cache, a model directory, a result).

Each fault also has a unit-sized test in tests/test_faults.py. The run is a tiny GPT (seconds per
run) so that many trials fit; the code paths are the ones every model takes.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import re
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from benchlib import REPO, machine, table  # noqa: E402

EXE = shutil.which("bigml", path=str(Path(sys.executable).parent)) or "bigml"
TINY = ["model=gpt-tiny", "model.num_layers=1", "model.hidden_size=32", "model.num_heads=2", "model.intermediate_size=64",
        "model.max_position_embeddings=64", "tokenizer.vocab_size=300", "data.block_size=32", "data.batch_size=8",
        "trainer.limit_val_batches=4", "logger=none", "optimizer.lr=3e-3", "trainer.precision=32-true",
        "trainer.log_every_n_steps=1"]
STEPS = 36
ARGS = [*TINY, f"trainer.max_steps={STEPS}", "checkpoint.every_n_steps=6", "trainer.val_check_interval=12"]
_WORDS = ("the a one every some cat dog bird fish model token layer river stone tree sees finds moves keeps makes "
          "holds quickly slowly under over near far red green small large old new").split()


@dataclass
class Outcome:
    survived: bool
    steps_lost: int | None = None
    data_lost: bool = False
    note: str = ""


@dataclass
class Fault:
    name: str
    what: str
    trial: Callable[[random.Random, int], Outcome]
    trials: int | None = None  # fewer for the expensive ones
    outcomes: list[Outcome] = field(default_factory=list)


class Lab:
    """A corpus, a warm cache, a reference run, and helpers to run and break bigml."""

    def __init__(self, root: Path):
        self.root = root
        self.corpus = self._make_corpus(root / "corpus")
        self.cache = root / "cache"
        self.env = {**os.environ, "BIGML_CACHE_DIR": str(self.cache), "CI": "1", "HF_HUB_OFFLINE": "1",
                    "HF_DATASETS_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false", "BIGML_OUTPUT_ROOT": str(root / "runs")}
        self.env.pop("BIGML_FAULT", None)
        self.n = 0
        code, err = self.run(self.dir("reference"))
        assert code == 0, err
        self.ref = self.metrics(self.dir("reference", new=False))
        self.can_mount = os.geteuid() == 0 and self._try_mount()

    @staticmethod
    def _make_corpus(root: Path) -> Path:
        rng = random.Random(0)
        root.mkdir(parents=True)
        for i in range(120):
            sentences = [" ".join([rng.choice(_WORDS[:9]), rng.choice(_WORDS[9:16]), rng.choice(_WORDS[16:22]),
                                   rng.choice(_WORDS[:9]), rng.choice(_WORDS[26:]), rng.choice(_WORDS[9:16])]).capitalize() + "."
                         for _ in range(rng.randint(5, 12))]
            (root / f"doc{i:04d}.txt").write_text(" ".join(sentences) + "\n")
        return root

    def _try_mount(self) -> bool:
        probe = self.root / "mount-probe"
        probe.mkdir()
        ok = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=1m", "tmpfs", str(probe)], capture_output=True).returncode == 0
        if ok:
            subprocess.run(["umount", str(probe)])
        return ok

    def dir(self, name: str, new: bool = True) -> Path:
        if new:
            self.n += 1
            return self.root / "runs" / f"{self.n:04d}-{name}"
        return next(p for p in sorted((self.root / "runs").glob(f"*-{name}")))

    def command(self, run: Path, *extra: str, command: str = "pretrain") -> list[str]:
        base = [*ARGS, f"data.path={self.corpus}"] if command == "pretrain" else []
        return [EXE, command, *base, f"hydra.run.dir={run}", *extra]

    def run(self, run: Path, *extra: str, env: dict | None = None, command: str = "pretrain") -> tuple[int, str]:
        p = subprocess.run(self.command(run, *extra, command=command), env={**self.env, **(env or {})},
                           capture_output=True, text=True, timeout=900)
        return p.returncode, p.stderr

    def start(self, run: Path, *extra: str, env: dict | None = None, command: str = "pretrain") -> tuple[subprocess.Popen, Path]:
        log = run.with_suffix(".err")
        run.parent.mkdir(parents=True, exist_ok=True)
        with open(log, "w") as f:
            p = subprocess.Popen(self.command(run, *extra, command=command), env={**self.env, **(env or {})},
                                 stdout=subprocess.DEVNULL, stderr=f)
        return p, log

    @staticmethod
    def wait_for_step(p: subprocess.Popen, log: Path, step: int, timeout: float = 600) -> bool:
        deadline = time.time() + timeout
        while time.time() < deadline:
            if progress(log.read_text()) >= step:
                return True
            if p.poll() is not None:
                return False
            time.sleep(0.02)
        return False

    @staticmethod
    def metrics(run: Path) -> dict:
        f = run / "metrics.json"
        return json.loads(f.read_text()) if f.exists() else {}

    def equal_to_reference(self, run: Path) -> bool:
        m = self.metrics(run)
        return (m.get("status") == "completed" and m.get("step") == self.ref["step"]
                and m.get("tokens_seen") == self.ref["tokens_seen"]
                and abs(m.get("val_loss", 1e9) - self.ref["val_loss"]) <= 1e-5
                and abs(m.get("train_loss", 1e9) - self.ref["train_loss"]) <= 1e-5)

    def resume(self, run: Path, *extra: str, env: dict | None = None) -> tuple[int, str, int | None]:
        """(exit code, stderr, the step the resumed run started from: its first logged step - 1)."""
        code, err = self.run(run, f"resume={run}", *extra, env=env)
        steps = [int(x) for x in re.findall(r"^step (\d+)/\d+", err, re.M)]
        return code, err, (min(steps) - 1 if steps else STEPS)


def progress(log_text: str) -> int:
    steps = [int(s) for s in re.findall(r"^step (\d+)/\d+", log_text, re.M)]
    return max(steps) if steps else 0


def clean_error(err: str) -> bool:
    """One line, no traceback: the promise for every failure."""
    return "Traceback" not in err and bool(re.search(r"^bigml \w+: error: ", err, re.M))


def flip_or_truncate(rng: random.Random, f: Path) -> str:
    data = bytearray(f.read_bytes())
    if not data:
        return "empty"
    if rng.random() < 0.5:
        at = rng.randrange(len(data))
        for i in range(at, min(at + rng.randint(1, 64), len(data))):
            data[i] = rng.randrange(256) if data[i] else 1
        if bytes(data) == f.read_bytes():
            data[at] ^= 0xFF
        f.write_bytes(bytes(data))
        return f"random bytes at {at}"
    f.write_bytes(bytes(data[: rng.randrange(len(data))]))
    return "truncated"


# -- the faults ---------------------------------------------------------------------------------------

def kill_and_resume(lab: Lab, rng: random.Random, run: Path, p: subprocess.Popen, log: Path, sig=signal.SIGKILL,
                    expect_code: int = -signal.SIGKILL) -> Outcome:
    p.send_signal(sig)
    code = p.wait(timeout=300)
    seen = progress(log.read_text())
    if code == 0:  # the fault came after the run finished: nothing to survive
        return Outcome(lab.equal_to_reference(run), 0, not lab.equal_to_reference(run), "finished first")
    if code != expect_code:
        return Outcome(False, None, False, f"exit {code}")
    if lab.metrics(run).get("status") == "completed":
        return Outcome(False, None, True, "an unfinished run says completed")
    if sig != signal.SIGKILL and not clean_error(log.read_text()):
        return Outcome(False, None, False, "no clean line")
    rcode, err, start = lab.resume(run)
    ok = rcode == 0 and lab.equal_to_reference(run)
    lost = max(seen - start, 0) if start is not None else seen
    return Outcome(ok, lost, not ok, "" if ok else f"resume exit {rcode}: {err.strip().splitlines()[-1:]}")


def sigkill_step(lab: Lab, rng: random.Random, _i: int) -> Outcome:
    run = lab.dir("sigkill-step")
    p, log = lab.start(run)
    if not lab.wait_for_step(p, log, rng.randint(1, STEPS - 2)):
        return Outcome(False, note="did not reach the step")
    time.sleep(rng.uniform(0, 0.3))
    return kill_and_resume(lab, rng, run, p, log)


def sigkill_write(target: str, max_n: int) -> Callable:
    def trial(lab: Lab, rng: random.Random, _i: int) -> Outcome:
        run = lab.dir(f"sigkill-write-{target.strip('.')}")
        p, log = lab.start(run, env={"BIGML_FAULT": f"kill:{target}:{rng.randint(1, max_n)}"})
        p.wait(timeout=600)
        return kill_and_resume(lab, rng, run, p, log) if p.returncode == -signal.SIGKILL else \
            Outcome(lab.equal_to_reference(run), 0, False, "no such write")
    return trial


def sigkill_startup(lab: Lab, rng: random.Random, i: int) -> Outcome:
    """Tokenizer training, tokenization and cache writes, killed at a random moment or mid-write."""
    cache = lab.root / f"cache-startup-{i}"
    env = {"BIGML_CACHE_DIR": str(cache)}
    run = lab.dir("sigkill-startup")
    if rng.random() < 0.5:
        env["BIGML_FAULT"] = f"kill:{rng.choice(['corpora', 'tokenizers'])}"
        p, log = lab.start(run, "dry_run=true", env=env)
        p.wait(timeout=600)
    else:
        p, log = lab.start(run, "dry_run=true", env=env)
        time.sleep(rng.uniform(0.5, 6.0))
        p.kill()
        p.wait()
    env.pop("BIGML_FAULT", None)
    code, err = lab.run(lab.dir("sigkill-startup-again"), "dry_run=true", env=env)
    from bigml.atomic import verify_directory

    entries = [d for kind in ("tokenizers", "corpora") for d in (cache / kind).glob("*") if d.is_dir()]
    intact = all(verify_directory(d) for d in entries) and len(entries) == 2
    return Outcome(code == 0 and intact, 0, not intact, "" if code == 0 else err.strip().splitlines()[-1])


def sigkill_eval(lab: Lab, rng: random.Random, _i: int) -> Outcome:
    model = lab.dir("reference", new=False) / "model"
    run = lab.dir("sigkill-eval")
    args = [f"model.path={model}", "data=text", f"data.path={lab.corpus}"]
    p, _log = lab.start(run, *args, command="eval")
    time.sleep(rng.uniform(0.2, 8.0))
    p.kill()
    code = p.wait()
    looks_done = lab.metrics(run).get("status") == "completed"
    if code == 0:
        return Outcome(True, 0, False, "finished first")
    code, err = lab.run(lab.dir("sigkill-eval-again"), *args, command="eval")
    return Outcome(code == 0 and not looks_done, 0, looks_done, "" if code == 0 else err.strip().splitlines()[-1])


def preemption(sig: signal.Signals) -> Callable:
    def trial(lab: Lab, rng: random.Random, _i: int) -> Outcome:
        run = lab.dir(f"{sig.name.lower()}")
        p, log = lab.start(run)
        if rng.random() < 0.15:  # during start-up: no checkpoint yet
            time.sleep(rng.uniform(0.5, 4.0))
        elif not lab.wait_for_step(p, log, rng.randint(1, STEPS - 2)):
            return Outcome(False, note="did not reach the step")
        else:
            time.sleep(rng.uniform(0, 0.3))
        p.send_signal(sig)
        code = p.wait(timeout=300)
        seen = progress(log.read_text())
        if code == 0:
            return Outcome(lab.equal_to_reference(run), 0, False, "finished first")
        if code != 143 or not clean_error(log.read_text()):
            return Outcome(False, None, False, f"exit {code}")
        if not (run / "checkpoints").exists():  # stopped before training: start again
            status_ok = lab.metrics(run).get("status") in ("preempted", None)
            shutil.rmtree(run)
            code, _ = lab.run(run)
            return Outcome(status_ok and code == 0 and lab.equal_to_reference(run), 0, False, "before training")
        if lab.metrics(run).get("status") != "preempted":
            return Outcome(False, None, False, "status is not preempted")
        rcode, err, start = lab.resume(run)
        ok = rcode == 0 and lab.equal_to_reference(run)
        return Outcome(ok, max(seen - (start or 0), 0), not ok, "" if ok else f"resume exit {rcode}")
    return trial


def disk_fault(kind: str) -> Callable:
    """enospc: the run directory on a small tmpfs that fills up; erofs: the tmpfs turns read-only
    at a random step (with root; else the BIGML_FAULT hook fails a random write)."""
    def trial(lab: Lab, rng: random.Random, i: int) -> Outcome:
        mnt = lab.root / f"mnt-{kind}-{i}"
        mnt.mkdir()
        mounted = False
        env = {}
        if lab.can_mount:  # a checkpoint of the tiny run is ~280 KB: the disk fills within the run
            size = rng.randint(300, 1100) if kind == "enospc" else 64 * 1024
            mounted = subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size}k", "tmpfs", str(mnt)]).returncode == 0
        if not mounted:
            target = rng.choice(["step-000012", "step-000024", "last.ckpt", "model", "metrics.json"])
            env["BIGML_FAULT"] = f"{kind}:{target}"
        run = mnt / "run"
        try:
            p, log = lab.start(run, env=env)
            ro = run / "checkpoints"
            if mounted and kind == "erofs" and lab.wait_for_step(p, log, rng.randint(7, STEPS - 2)):
                # checkpoints/ turns read-only (a remount of the whole tmpfs is refused while the
                # log file is open for writing): a read-only bind mount over it
                subprocess.run(["mount", "--bind", str(ro), str(ro)], check=True)
                subprocess.run(["mount", "-o", "remount,bind,ro", str(ro)], check=True)
            code = p.wait(timeout=600)
            err = log.read_text()
            seen = progress(err)
            if code == 0:
                return Outcome(False, 0, False, "not injected: no write failed")
            words = "no space left" if kind == "enospc" else "read-only"
            if code != 1 or not clean_error(err) or words not in err.strip().splitlines()[-1]:
                return Outcome(False, None, False, f"exit {code}: {err.strip().splitlines()[-1][:120]}")
            if lab.metrics(run).get("status") == "completed":
                return Outcome(False, None, True, "looks finished")
            from bigml.atomic import CorruptFile, verify_file

            try:
                for c in (run / "checkpoints").glob("*.ckpt"):
                    verify_file(c)
            except CorruptFile as e:
                return Outcome(False, None, True, str(e))
            if mounted:  # make room / make it writable again, then continue
                if kind == "erofs":
                    subprocess.run(["umount", str(ro)])
                subprocess.run(["mount", "-o", "remount,rw,size=256m", str(mnt)])
            env.pop("BIGML_FAULT", None)
            rcode, rerr, start = lab.resume(run, env=env)
            ok = rcode == 0 and lab.equal_to_reference(run)
            return Outcome(ok, max(seen - (start or 0), 0), not ok, "" if ok else rerr.strip().splitlines()[-1][:120])
        finally:
            if mounted:
                subprocess.run(["umount", "-l", str(run / "checkpoints")], capture_output=True)
                subprocess.run(["umount", "-l", str(mnt)])
    return trial


def corrupt_checkpoint(lab: Lab, rng: random.Random, _i: int) -> Outcome:
    run = lab.dir("corrupt-checkpoint")
    p, log = lab.start(run)
    if not lab.wait_for_step(p, log, rng.randint(13, STEPS - 2)):
        return Outcome(False, note="did not reach the step")
    p.kill()
    p.wait()
    seen = progress(log.read_text())
    victims = sorted((run / "checkpoints").glob("*.ckpt"))
    victim = rng.choice(victims)
    how = flip_or_truncate(rng, victim)
    rcode, err, start = lab.resume(run)
    ok = rcode == 0 and lab.equal_to_reference(run)
    detected = "skipping checkpoint" in err or victim.name == "best.ckpt"
    return Outcome(ok and detected, max(seen - (start or 0), 0), not ok, f"{victim.name} {how}" if not ok else "")


def corrupt_cache(lab: Lab, rng: random.Random, i: int) -> Outcome:
    cache = lab.root / f"cache-corrupt-{i}"
    env = {"BIGML_CACHE_DIR": str(cache)}
    code, _ = lab.run(lab.dir("cache-fill"), "dry_run=true", env=env)
    files = [f for kind in ("tokenizers", "corpora") for f in (cache / kind).glob("*/*") if f.is_file()]
    victim = rng.choice(files)
    how = flip_or_truncate(rng, victim)
    run = lab.dir("corrupt-cache")
    code, err = lab.run(run, env=env)
    from bigml.atomic import verify_directory

    rebuilt = "rebuilding it" in err
    intact = verify_directory(victim.parent) if victim.parent.exists() else False
    ok = code == 0 and rebuilt and intact and lab.equal_to_reference(run)
    return Outcome(ok, 0, not intact, "" if ok else f"{victim.name} {how}: exit {code}")


def corrupt_model_dir(lab: Lab, rng: random.Random, i: int) -> Outcome:
    model = lab.root / f"model-copy-{i}"
    shutil.copytree(lab.dir("reference", new=False) / "model", model)
    victim = rng.choice([f for f in model.iterdir() if f.is_file() and f.name != "SHA256SUMS"])
    how = flip_or_truncate(rng, victim)
    p = subprocess.run([EXE, "generate", f"model.path={model}", "prompt=the cat", "max_new_tokens=4"], env=lab.env,
                       capture_output=True, text=True, timeout=300)
    last = p.stderr.strip().splitlines()[-1] if p.stderr.strip() else ""
    ok = p.returncode == 2 and clean_error(p.stderr) and victim.name in last
    return Outcome(ok, 0, False, "" if ok else f"{victim.name} {how}: exit {p.returncode} {last[:100]}")


def nan_loss(lab: Lab, rng: random.Random, i: int) -> Outcome:
    policy = ("stop", "skip", "rollback")[i % 3]
    step = rng.randint(1, STEPS - 1)
    run = lab.dir(f"nan-{policy}")
    code, err = lab.run(run, f"trainer.on_nonfinite={policy}", env={"BIGML_FAULT_NAN_STEPS": str(step)})
    m = lab.metrics(run)
    if policy == "stop":
        ok = code == 1 and m.get("status") == "diverged" and clean_error(err)
        ckpts = sorted(int(c.stem.split("-")[1]) for c in (run / "checkpoints").glob("step-*.ckpt"))
        return Outcome(ok, step - (ckpts[-1] if ckpts else 0), False, policy if ok else f"{policy}: exit {code}")
    if policy == "skip":
        ok = code == 0 and m.get("status") == "completed" and m.get("nonfinite_skipped") == 1
        return Outcome(ok, 1, False, policy if ok else f"{policy}: exit {code}")
    ok = code == 0 and m.get("status") == "completed" and m.get("rollbacks") == 1
    back = re.search(r"rolling back to (step-0*(\d+)|last)\.ckpt", err)
    return Outcome(ok, step - (step // 6) * 6 if back else None, False, policy if ok else f"{policy}: exit {code}")


def ddp_rank_death(lab: Lab, rng: random.Random, _i: int) -> Outcome:
    import psutil

    run = lab.dir("ddp")
    p, log = lab.start(run, "trainer=ddp", "trainer.accelerator=cpu", "trainer.devices=2", "trainer.max_steps=100000")
    if not lab.wait_for_step(p, log, rng.randint(2, 30)):
        return Outcome(False, note="did not reach the step")
    children = psutil.Process(p.pid).children()
    if not children:
        return Outcome(False, note="no second rank")
    victim_is_rank0 = rng.random() < 0.5
    t0 = time.time()
    if victim_is_rank0:
        p.kill()
        p.wait()
        survivor = children[0]
        try:
            survivor.wait(timeout=120)
        except psutil.TimeoutExpired:
            survivor.kill()
            return Outcome(False, None, False, "rank 1 hung")
        ok = True
    else:
        children[0].kill()
        try:
            code = p.wait(timeout=120)
        except subprocess.TimeoutExpired:
            p.kill()
            return Outcome(False, None, False, "rank 0 hung")
        ok = code == 1 and clean_error(log.read_text())
    took = time.time() - t0
    return Outcome(ok and took < 60, None, False, f"{'rank 0' if victim_is_rank0 else 'rank 1'} killed, the other gone in {took:.1f} s")


def concurrent_cache(lab: Lab, rng: random.Random, i: int) -> Outcome:
    cache = lab.root / f"cache-concurrent-{i}"
    env = {"BIGML_CACHE_DIR": str(cache)}
    runs = [lab.dir("concurrent"), lab.dir("concurrent")]
    first, _ = lab.start(runs[0], "dry_run=true", env=env)
    time.sleep(rng.uniform(0, 1.5))
    second, _ = lab.start(runs[1], "dry_run=true", env=env)
    codes = [first.wait(timeout=600), second.wait(timeout=600)]
    from bigml.atomic import verify_directory

    entries = {kind: [d for d in (cache / kind).glob("*") if d.is_dir()] for kind in ("tokenizers", "corpora")}
    one_each = all(len(v) == 1 and verify_directory(v[0]) for v in entries.values())
    same = lab.metrics(runs[0]).get("tokens") == lab.metrics(runs[1]).get("tokens")
    return Outcome(codes == [0, 0] and one_each and same, 0, not one_each, f"exit codes {codes}")


def bad_rows(lab: Lab, rng: random.Random, i: int) -> Outcome:
    path = lab.root / f"bad-{i}.jsonl"
    n, k = 100_000, rng.randint(1, 20)
    bad_at = set(rng.sample(range(n), k))
    kinds = [b'{"text": "unterminated\n', b'["not", "an object"]\n', b'{"text": "bytes \xff\xfe"}\n', b"garbage\n"]
    with open(path, "wb") as f:
        for j in range(n):
            if j in bad_at:
                f.write(rng.choice(kinds))
            else:
                f.write((json.dumps({"text": " ".join(rng.choice(_WORDS) for _ in range(12))}) + "\n").encode())
    first = min(bad_at) + 1
    code, err = lab.run(lab.dir("bad-rows-error"), f"data.path={path}", "dry_run=true")
    named = code == 2 and clean_error(err) and f"at line {first};" in err.strip().splitlines()[-1]
    run = lab.dir("bad-rows-skip")
    code2, _ = lab.run(run, f"data.path={path}", "dry_run=true", "data.on_bad_rows=skip")
    # the dry run's metrics do not carry the count; the packed corpus records it
    counted = code2 == 0 and _skipped_in_cache(lab) == k
    return Outcome(named and counted, 0, False, f"{k} bad rows of {n}" + ("" if named and counted else f"; exit {code}/{code2}"))


def _skipped_in_cache(lab: Lab) -> int:
    newest = max((d for d in (lab.cache / "corpora").glob("*") if d.is_dir()), key=lambda d: d.stat().st_mtime)
    return int(json.loads((newest / "meta.json").read_text()).get("bad_rows_skipped", -1))


def untrusted(lab: Lab, rng: random.Random, i: int) -> Outcome:
    import pickle

    marker = lab.root / f"pwned-{i}"
    evil = lab.root / f"evil-{i}.ckpt"

    class Payload:
        def __reduce__(self):
            return (os.system, (f"touch {marker}",))

    with open(evil, "wb") as f:
        pickle.dump({"state_dict": {}, "global_step": Payload()}, f)
    code, err = lab.run(lab.dir("untrusted-ckpt"), f"resume={evil}")
    name = rng.choice(["../../escaped", "/tmp/escaped", "a/../../b", ".."])
    code2, err2 = lab.run(lab.dir("untrusted-name"), "logger=csv", f"logger.name={name}")
    ok = code == 2 and not marker.exists() and clean_error(err) and code2 == 2 and "plain name" in err2
    return Outcome(ok, 0, marker.exists(), f"logger.name={name}")


FAULTS = [
    Fault("sigkill-step", "SIGKILL at a random moment of training", sigkill_step),
    Fault("sigkill-checkpoint", "SIGKILL in the middle of a checkpoint write (random write)", sigkill_write(".ckpt", 24)),
    Fault("sigkill-export", "SIGKILL in the middle of writing model/", sigkill_write("model", 1)),
    Fault("sigkill-startup", "SIGKILL during tokenizer training, tokenization or a cache write", sigkill_startup),
    Fault("sigkill-eval", "SIGKILL during `bigml eval`", sigkill_eval),
    Fault("sigterm", "SIGTERM (preemption) at a random moment", preemption(signal.SIGTERM)),
    Fault("sigusr1", "SIGUSR1 (SLURM pre-emption warning) at a random moment", preemption(signal.SIGUSR1)),
    Fault("enospc", "disk full (a small tmpfs run directory)", disk_fault("enospc")),
    Fault("erofs", "the output filesystem turns read-only mid-run", disk_fault("erofs")),
    Fault("corrupt-checkpoint", "random bytes or truncation in a random checkpoint, then resume", corrupt_checkpoint),
    Fault("corrupt-cache", "random bytes or truncation in a cached tokenizer or tokenized corpus", corrupt_cache),
    Fault("corrupt-model", "random bytes or truncation in a file of a model directory", corrupt_model_dir),
    Fault("nan", "NaN loss at a random step (stop, skip, rollback in turn)", nan_loss),
    Fault("ddp-rank-death", "one of two gloo DDP ranks SIGKILLed at a random step", ddp_rank_death, trials=4),
    Fault("concurrent-cache", "two runs building the same tokenizer and corpus cache at once", concurrent_cache),
    Fault("bad-rows", "malformed JSONL lines (1-20 of 100,000, random kinds and places)", bad_rows),
    Fault("untrusted", "a checkpoint that runs code when unpickled; a run name that leads out", untrusted, trials=2),
]


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--trials", type=int, default=10)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--only", default="", help="comma-separated fault names")
    p.add_argument("--quick", action="store_true", help="2 trials each, no DDP: checks the script runs")
    p.add_argument("--out", type=Path, default=REPO / "RELIABILITY.md")
    a = p.parse_args()
    only = {s for s in a.only.split(",") if s}
    faults = [f for f in FAULTS if (not only or f.name in only) and not (a.quick and f.name == "ddp-rank-death")]
    t_start = time.time()
    with tempfile.TemporaryDirectory(prefix="bigml-faults-") as tmp:
        lab = Lab(Path(tmp))
        for fault in faults:
            n = 2 if a.quick else min(a.trials, fault.trials or a.trials)
            for i in range(n):
                rng = random.Random(f"{a.seed}-{fault.name}-{i}")
                t0 = time.time()
                try:
                    o = fault.trial(lab, rng, i)
                except Exception as e:  # noqa: BLE001 - a harness error is a failed trial, with its reason
                    o = Outcome(False, None, False, f"harness: {type(e).__name__}: {e}")
                fault.outcomes.append(o)
                print(f"{fault.name} #{i}: {'survived' if o.survived else 'FAILED'} steps_lost={o.steps_lost} "
                      f"data_lost={o.data_lost} {o.note} ({time.time() - t0:.0f} s)", flush=True)
        mounted = lab.can_mount
    results = {}
    if only and a.out.exists():  # keep the other faults' rows from the last full run
        text = a.out.read_text()
        m = re.search(r"<!-- faults-data (.*) -->", text)
        results = json.loads(m.group(1)) if m else {}
        for line in text.splitlines() if not m else []:  # a table written before the data comment existed
            cells = [c.strip() for c in line.strip().strip("|").split(" | ")]
            if len(cells) >= 7 and cells[0] in {f.name for f in FAULTS}:
                results[cells[0]] = [*cells[:7], cells[7] if len(cells) > 7 else "--trials 1"]
    for f in faults:
        lost = [o.steps_lost for o in f.outcomes if o.steps_lost is not None]
        failures = sorted({o.note for o in f.outcomes if not o.survived})
        results[f.name] = [f.name, f.what, len(f.outcomes), sum(o.survived for o in f.outcomes),
                           f"{statistics.mean(lost):.1f} / {max(lost)}" if lost else "-",
                           sum(o.data_lost for o in f.outcomes), "; ".join(failures)[:200] or "-",
                           " ".join(sys.argv[1:]) or "(defaults)"]
    rows = [results[f.name] for f in FAULTS if f.name in results]
    cmd = "python scripts/faults.py " + " ".join(sys.argv[1:])
    text = f"""# Reliability under faults

Written by `make faults` (last: `{cmd.strip()}`, {time.time() - t_start:.0f} s; with `--only`, the other
rows are kept from the run named in their last column); never edited by hand.
Each fault is injected at seeded random points into a tiny GPT pretraining run ({STEPS} steps, a
checkpoint every 6, fp32 on CPU; `bigml pretrain {' '.join(ARGS)}`) or the command named. A trial
*survives* when it ends in the promised state: the documented exit code with one line and no
traceback, no unfinished run that says "completed", the damaged file detected (named, skipped or
rebuilt), and wherever the run can continue, `resume` ending equal to an uninterrupted run (loss to
1e-5, the same tokens). *Steps lost*: mean / max of the training redone after the fault (progress
when it hit minus the step resumed from). *Data lost*: trials that lost anything else.
Disk faults: {"a real tmpfs (mount), filled or remounted read-only" if mounted else "the BIGML_FAULT write hook (no permission to mount a tmpfs here)"}.

{table(["fault", "what", "trials", "survived", "steps lost", "data lost", "failures", "run with"], rows)}

How each one is handled (the unit tests are in tests/test_faults.py):
- kills: every file is written to a temporary name and renamed (bigml/atomic.py); checkpoints carry a
  `.sha256` kept in step, directories a `SHA256SUMS`, so a half-written or damaged file is never used;
  a resumed run removes the temporaries a killed writer left.
- SIGTERM / SIGUSR1: a checkpoint at the next step boundary, exit 143, "status": "preempted"
  (bigml/training/preemption.py).
- disk full / read-only: one line, exit 1, "status": "failed" where it can still be written; earlier
  checkpoints untouched.
- damaged checkpoints: skipped for the previous good one; damaged caches: rebuilt with a warning;
  damaged model directories: exit 2 naming the file.
- NaN: `trainer.on_nonfinite=stop|skip|rollback` (bigml/training/nonfinite.py).
- DDP: a rank > 0 dies with its parent; a dead peer fails the next collective within seconds (one
  line, exit 1); `trainer.ddp_timeout_s` bounds any other wait.
- caches: built under a file lock and published once (bigml/data/cache.py).
- bad rows: `data.on_bad_rows=error|skip` (bigml/data/bad_rows.py).
- untrusted inputs: checkpoints load with `weights_only=True`; run directories stay under output_root.

_Machine: {machine()}_

<!-- faults-data {json.dumps(results)} -->
"""
    a.out.write_text(text)
    print(f"wrote {a.out}")
    return 0 if all(o.survived for f in faults for o in f.outcomes) else 1


if __name__ == "__main__":
    sys.exit(main())
