#!/usr/bin/env python3
"""Stand-ins for gcloud, srun, scancel, scontrol, sudo and fuser, and a recording trainer
interpreter, so that tests/test_launch.py runs the real launchers on one machine.

One file, installed under each command's name (tests/test_launch.py copies it into a bin
folder put first on PATH); it acts as the name it was called by. Every call appends a JSON
line {cmd, argv, cwd, pid, env} to $STUB_LOG, so a test sees what each side received.

  gcloud compute tpus tpu-vm describe|create|scp|ssh   a slice of $STUB_NUM_WORKERS (2)
      workers, each a home folder $STUB_WORKERS/w<i>; `describe` fails until `create` ran
      when STUB_TPU_MISSING=1; `ssh --command=CMD` runs `bash -c CMD` in every worker's home
      at once, with an environment as bare as a login's (plus the names in $STUB_REMOTE_ENV),
      TPU_WORKER_ID and an explicit JAX coordinator for the 2 local CPU processes.
  srun     runs its command $STUB_NTASKS (2) times at once with SLURM_* and JAX_COORDINATOR_*
      set, forwards signals to the tasks as srun does, and writes their pids for scancel.
  scancel --signal=SIG JOB   sends SIG to srun's tasks (what slurmd does for the job's steps).
  scontrol, sudo   record; sudo then runs the command (without privileges).
  fuser [-s] [-k] [-SIGNAL] FILE...   finds holders through /proc/*/fd and signals them.
  trainer-python   records (with its pid: the trainer's, after the exec), then execs
      $STUB_REAL_PYTHON with the same arguments.
"""

import fcntl
import json
import os
import signal
import socket
import subprocess
import sys

LOGIN_ENV = ("PATH", "LANG", "LC_ALL", "TMPDIR", "USER", "LOGNAME", "TERM")
VALUE_FLAGS = {"zone", "project", "worker", "command", "accelerator-type", "version"}


def record(name, argv):
  line = json.dumps(dict(cmd=name, argv=argv, cwd=os.getcwd(), pid=os.getpid(),
                         env=dict(os.environ))) + "\n"
  with open(os.environ["STUB_LOG"], "a") as f:
    fcntl.flock(f, fcntl.LOCK_EX)
    f.write(line)


def fail(msg):
  print(f"stub {msg}", file=sys.stderr)
  return 2


def free_port() -> int:
  with socket.socket() as s:
    s.bind(("127.0.0.1", 0))
    return s.getsockname()[1]


def state(name) -> str:
  d = os.environ["STUB_STATE"]
  os.makedirs(d, exist_ok=True)
  return os.path.join(d, name)


def run_all(procs, forward=(signal.SIGTERM, signal.SIGINT, signal.SIGHUP)) -> int:
  """Waits for every child, passing the given signals on; the first failure's status."""
  def pass_on(sig, _):
    for p in procs:
      if p.poll() is None:
        p.send_signal(sig)
  for sig in forward:
    signal.signal(sig, pass_on)
  codes = [p.wait() for p in procs]
  bad = [c for c in codes if c != 0]
  return 0 if not bad else (128 - bad[0] if bad[0] < 0 else bad[0])


# ---------------------------------------------------------------- gcloud

def parse_flags(argv):
  pos, flags, i = [], {}, 0
  while i < len(argv):
    a = argv[i]
    if a.startswith("--"):
      name, eq, value = a[2:].partition("=")
      if not eq and name in VALUE_FLAGS and i + 1 < len(argv):
        value, i = argv[i + 1], i + 1
      flags[name] = value if (eq or name in VALUE_FLAGS) else True
    else:
      pos.append(a)
    i += 1
  return pos, flags


def workers(flags):
  n = int(os.environ.get("STUB_NUM_WORKERS", "2"))
  which = flags.get("worker")
  if which is None:
    return None
  ids = range(n) if which == "all" else [int(w) for w in str(which).split(",")]
  homes = []
  for i in ids:
    home = os.path.join(os.environ["STUB_WORKERS"], f"w{i}")
    os.makedirs(home, exist_ok=True)
    homes.append((i, home))
  return homes


def remote_path(home, dest):
  path = dest.split(":", 1)[1]
  if path.startswith("/"):
    raise ValueError(f"absolute remote path {path!r}: only paths under the home are modelled")
  path = path[2:] if path.startswith("~/") else path.lstrip("~")
  return os.path.join(home, path)


def gcloud(argv):
  pos, flags = parse_flags(argv)
  if pos[:3] != ["compute", "tpus", "tpu-vm"] or len(pos) < 5:
    return fail(f"gcloud: unsupported command {argv}")
  verb = pos[3]
  exists = state("tpu_created")
  if verb == "describe":
    if os.environ.get("STUB_TPU_MISSING") == "1" and not os.path.exists(exists):
      print(f"ERROR: NOT_FOUND: {pos[4]}", file=sys.stderr)
      return 1
    print("state: READY")
    return 0
  if verb == "create":
    open(exists, "w").close()
    return 0
  homes = workers(flags)
  if homes is None:
    return fail(f"gcloud {verb}: pass --worker (all or ids) for a multi-worker slice")
  if verb == "scp":
    *sources, dest = pos[4:]
    for _, home in homes:
      target = remote_path(home, dest)
      if len(sources) > 1 or target.endswith("/"):
        os.makedirs(target, exist_ok=True)
      subprocess.run(["cp", *sources, target], check=True)
    return 0
  if verb == "ssh":
    if "command" not in flags:
      return fail("gcloud ssh: this stub models --command only")
    port = free_port()
    procs = []
    for i, home in homes:
      env = {k: os.environ[k] for k in LOGIN_ENV if k in os.environ}
      env.update({k: os.environ[k] for k in os.environ.get("STUB_REMOTE_ENV", "").split()
                  if k in os.environ})
      env.update(HOME=home, TPU_WORKER_ID=str(i), JAX_PLATFORMS="cpu",
                 JAX_COORDINATOR_ADDRESS=f"127.0.0.1:{port}",
                 JAX_NUM_PROCESSES=str(len(homes)), JAX_PROCESS_ID=str(i))
      procs.append(subprocess.Popen(["bash", "-c", flags["command"]], cwd=home, env=env))
    return run_all(procs)
  return fail(f"gcloud: unsupported verb {verb}")


# ---------------------------------------------------------------- Slurm

def srun(argv):
  i = 0
  while i < len(argv) and argv[i].startswith("-"):
    i += 1
    if argv[i - 1] == "--":
      break
  cmd = argv[i:]
  if not cmd:
    return fail("srun: no command")
  n = int(os.environ.get("STUB_NTASKS", "2"))
  port = free_port()
  procs = []
  for r in range(n):
    env = dict(os.environ, SLURM_PROCID=str(r), SLURM_LOCALID=str(r), SLURM_NODEID="0",
               SLURM_NTASKS=str(n), SLURM_NPROCS=str(n), SLURM_STEP_ID="0",
               SLURM_STEP_NODELIST="localhost", SLURM_STEP_NUM_NODES="1",
               SLURM_JOB_ID=os.environ.get("SLURM_JOB_ID", "1"),
               # what Slurm's GPU plugin sets for a step on a node: all of the node's GPUs
               CUDA_VISIBLE_DEVICES=",".join(str(g) for g in range(n)),
               JAX_PLATFORMS="cpu", JAX_COORDINATOR_ADDRESS=f"127.0.0.1:{port}",
               JAX_NUM_PROCESSES=str(n), JAX_PROCESS_ID=str(r))
    procs.append(subprocess.Popen(cmd, env=env))
  with open(state("srun_tasks.pids"), "w") as f:
    f.write(" ".join(str(p.pid) for p in procs))
  return run_all(procs, forward=(signal.SIGTERM, signal.SIGINT, signal.SIGHUP,
                                 signal.SIGUSR1, signal.SIGUSR2))


def to_signal(name: str) -> int:
  return int(name) if name.isdigit() else signal.Signals["SIG" + name.upper().lstrip("-")]


def scancel(argv):
  sig = None
  for i, a in enumerate(argv):
    if a.startswith("--signal="):
      sig = to_signal(a.split("=", 1)[1])
    elif a == "-s" and i + 1 < len(argv):
      sig = to_signal(argv[i + 1])
  if sig is None:
    return fail("scancel: this stub models --signal only")
  with open(state("srun_tasks.pids")) as f:
    pids = [int(p) for p in f.read().split()]
  for pid in pids:
    try:
      os.kill(pid, sig)
    except ProcessLookupError:
      pass
  return 0


# ---------------------------------------------------------------- a worker's tools

def sudo(argv):
  while argv and argv[0].startswith("-"):
    argv = argv[1:]
  if not argv:
    return fail("sudo: no command")
  os.execvp(argv[0], argv)


def holders(path):
  target, found = os.path.realpath(path), set()
  for pid in filter(str.isdigit, os.listdir("/proc")):
    try:
      fds = os.listdir(f"/proc/{pid}/fd")
    except OSError:
      continue
    for fd in fds:
      try:
        if os.readlink(f"/proc/{pid}/fd/{fd}") == target and int(pid) != os.getpid():
          found.add(int(pid))
      except OSError:
        pass
  return found


def fuser(argv):
  silent, kill, sig, files = False, False, signal.SIGKILL, []
  for a in argv:
    if a == "-s":
      silent = True
    elif a == "-k":
      kill = True
    elif a.startswith("-") and a[1:].isalpha() and a[1:].isupper():
      sig = to_signal(a[1:])
    elif a.startswith("-"):
      return fail(f"fuser: unsupported option {a}")
    else:
      files.append(a)
  pids = set().union(*(holders(f) for f in files)) if files else set()
  if kill:
    for pid in pids:
      try:
        os.kill(pid, sig)
      except ProcessLookupError:
        pass
  if not silent and pids:
    print("".join(f" {p}" for p in sorted(pids)))
  return 0 if pids else 1


def trainer_python(argv):
  real = os.environ["STUB_REAL_PYTHON"]
  os.execv(real, [real, *argv])


COMMANDS = {"gcloud": gcloud, "srun": srun, "scancel": scancel, "sudo": sudo,
            "scontrol": lambda argv: 0, "fuser": fuser, "trainer-python": trainer_python}

if __name__ == "__main__":
  name = os.path.basename(sys.argv[0])
  if name not in COMMANDS:
    sys.exit(fail(f"{name}: install this file under one of {sorted(COMMANDS)}"))
  record(name, sys.argv[1:])
  sys.exit(COMMANDS[name](sys.argv[1:]))
