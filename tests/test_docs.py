"""The documentation stays runnable: every `python <script>.py ...` command in a fenced code block of README.md or
docs/*.md parses with that script's own parse_args, README.md stays a short front door, and its "add your own
reward" example registers a working reward.

Only parsing is checked (nothing runs). A path-valued flag whose file or folder does not exist here (a user's
`--data celeba_hq/`, an `--inception` weights file, an older checkpoint) gets an empty stand-in in a temporary
folder, because some parsers check that such paths exist and the docs legitimately name files a reader supplies.
"""
import glob
import os
import re
import shlex

import numpy as np
import pytest
import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SCRIPTS = [s for s in ("graft_molecule", "graft_layout", "noise_correction", "graft_t2i")
           if os.path.isfile(os.path.join(ROOT, s + ".py"))]
DOC_FILES = [os.path.join(ROOT, "README.md")] + sorted(glob.glob(os.path.join(ROOT, "docs", "*.md")))
README_MAX_BYTES = 10_240
COMMAND = re.compile(r"\bpython3?\s+(?:\./)?(" + "|".join(SCRIPTS) + r")\.py\b")
SEPARATORS = {"&&", "||", ";", "|"}
ENV_ASSIGNMENT = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*=")
DIR_FLAGS = {"--data", "--data_dir", "--data_root", "--cache_dir", "--out"}
PATH_SUFFIX = re.compile(r"\.(pt|pth|npy|npz|ckpt|safetensors|json|txt|csv)$")


def fenced_blocks(text):
    """(line number of the first line, [lines]) of every ``` or ~~~ fenced block, indented fences included."""
    blocks, fence, start, body = [], None, 0, []
    for i, line in enumerate(text.splitlines(), 1):
        stripped = line.lstrip()
        if fence is None and stripped.startswith(("```", "~~~")):
            fence, start, body, indent = stripped[:3], i + 1, [], len(line) - len(stripped)
        elif fence is not None and stripped.startswith(fence):
            blocks.append((start, body))
            fence = None
        elif fence is not None:
            body.append(line[indent:] if line[:indent].strip() == "" else line)
    return blocks


def logical_lines(start, lines):
    """Join trailing-backslash continuations: (line number, joined text)."""
    out, buf, first = [], [], None
    for k, line in enumerate(lines):
        first = start + k if not buf else first
        if line.rstrip().endswith("\\"):
            buf.append(line.rstrip()[:-1])
            continue
        out.append((first, " ".join(buf + [line])))
        buf = []
    if buf:
        out.append((first, " ".join(buf)))
    return out


def script_commands(tokens):
    """(script, argv) for each `python <script>.py ...` in a shell-split line (separators, env prefixes handled)."""
    segments, seg = [], []
    for t in tokens:
        if t in SEPARATORS:
            segments.append(seg)
            seg = []
        else:
            seg.append(t)
    segments.append(seg)
    found = []
    for seg in segments:
        while seg and (ENV_ASSIGNMENT.match(seg[0]) or seg[0] in ("$", "env")):
            seg = seg[1:]
        if len(seg) >= 2 and seg[0] in ("python", "python3"):
            m = re.fullmatch(r"(?:\./)?(" + "|".join(SCRIPTS) + r")\.py", seg[1])
            if m:
                found.append((m.group(1), seg[2:]))
    return found


def collect():
    """Every documented command: (relative file, line, command text, script, argv)."""
    cmds = []
    for path in DOC_FILES:
        with open(path, encoding="utf-8") as f:
            text = f.read()
        for start, body in fenced_blocks(text):
            for line_no, line in logical_lines(start, body):
                if not COMMAND.search(line):
                    continue
                rel = os.path.relpath(path, ROOT)
                try:
                    tokens = shlex.split(line, comments=True)
                except ValueError as e:  # unbalanced quotes: the command is broken as written
                    cmds.append((rel, line_no, line.strip(), None, str(e)))
                    continue
                for script, argv in script_commands(tokens):
                    cmds.append((rel, line_no, line.strip(), script, argv))
    return cmds


COMMANDS = collect()


def with_stand_ins(argv, tmp_path):
    """argv with every missing path-valued argument replaced by an empty file or folder under tmp_path."""
    out = list(argv)
    for i, a in enumerate(argv):
        flag, value = (a.split("=", 1) if a.startswith("--") and "=" in a else
                       (argv[i - 1] if i else "", a))
        if not flag.startswith("--") or value.startswith(("-", "hf:")):
            continue
        if not ("/" in value or PATH_SUFFIX.search(value)) or os.path.exists(os.path.join(ROOT, value)):
            continue
        stand_in = tmp_path / "stand_ins" / value.strip("/").replace("/", "__")
        if flag in DIR_FLAGS or value.endswith("/"):
            stand_in.mkdir(parents=True, exist_ok=True)
        else:
            stand_in.parent.mkdir(parents=True, exist_ok=True)
            stand_in.touch()
        out[i] = f"{flag}={stand_in}" if a.startswith("--") and "=" in a else str(stand_in)
    return out


@pytest.mark.parametrize("where,line,cmd,script,argv", COMMANDS,
                         ids=[f"{c[0]}:{c[1]}" for c in COMMANDS])
def test_documented_command_parses(where, line, cmd, script, argv, tmp_path, monkeypatch, capsys):
    if script is None:
        pytest.fail(f"{where}:{line}: `{cmd}` cannot be split like a shell command: {argv}")
    if "--help" in argv or "-h" in argv:
        pytest.skip("--help exits by design")
    import importlib
    module = importlib.import_module(script)
    monkeypatch.chdir(ROOT)  # relative paths in the docs are relative to the repository root
    try:
        module.parse_args(with_stand_ins(argv, tmp_path))
    except SystemExit as e:
        err = capsys.readouterr().err.strip().splitlines()
        pytest.fail(f"{where}:{line}: `{cmd}` does not parse (exit {e.code}): {err[-1] if err else e}")
    except Exception as e:  # a parser that crashes is as broken for the reader as one that rejects the command
        pytest.fail(f"{where}:{line}: `{cmd}`: parse_args raised {type(e).__name__}: {e}")


def test_every_script_has_a_documented_command():
    """Otherwise the test above could pass by finding nothing."""
    assert SCRIPTS, "no task scripts found in the repository root"
    found = {c[3] for c in COMMANDS}
    missing = [s for s in SCRIPTS if s not in found]
    assert not missing, f"no `python <script>.py ...` command in a fenced block of README.md or docs/*.md for {missing}"


def test_readme_is_a_short_front_door():
    path = os.path.join(ROOT, "README.md")
    size = os.path.getsize(path)
    assert size <= README_MAX_BYTES, f"README.md is {size:,} bytes, at most {README_MAX_BYTES:,}: move results to docs/"
    with open(path, encoding="utf-8") as f:
        head = "".join(f.readlines()[:40])
    for needed in ("pip install -r requirements.txt", "python graft_molecule.py --n_i 0.25", "python -m pytest"):
        assert needed in head, f"README.md's first 40 lines lack `{needed}`"
    ci = os.path.join(ROOT, ".ci", "run")
    if os.path.isfile(ci):  # the README's test command is the one CI runs
        with open(ci) as f:
            m = re.search(r"python -m pytest[^#\n]*", f.read())
        assert m is None or m.group(0).strip() in head, \
            f"README.md's first 40 lines lack CI's test command `{m.group(0).strip()}`"


def test_readme_reward_example_registers_a_working_reward(monkeypatch):
    """README's "add your own reward" block, run with main() replaced by parse_args: the reward is registered
    under the name the command uses, the flags parse, and the reward maps real Molecule objects to shape (B,)."""
    import graft_molecule
    with open(os.path.join(ROOT, "README.md"), encoding="utf-8") as f:
        text = f.read()
    blocks = ["\n".join(body) for _, body in fenced_blocks(text) if any("REWARDS[" in b for b in body)]
    assert blocks, "README.md has no code block that registers a reward in REWARDS"
    monkeypatch.setattr(graft_molecule, "REWARDS", dict(graft_molecule.REWARDS))
    before, calls = set(graft_molecule.REWARDS), []
    monkeypatch.setattr(graft_molecule, "main", lambda argv=None: calls.append(graft_molecule.parse_args(argv)))
    monkeypatch.chdir(ROOT)
    exec(compile(blocks[0], "README.md (add your own reward)", "exec"), {"__name__": "readme_example"})
    added = set(graft_molecule.REWARDS) - before
    assert len(added) == 1, f"the example should register one reward, registered {sorted(added)}"
    assert calls and calls[0].reward in added, "the example should call main() with --reward set to its reward"
    s = 1.089 / 3 ** 0.5  # methane: C-H 1.089 Angstrom, tetrahedral
    pos = np.array([[0, 0, 0], [s, s, s], [-s, -s, s], [-s, s, -s], [s, -s, -s]], np.float32)
    mols = [graft_molecule.Molecule(pos, np.array([1, 0, 0, 0, 0])) for _ in range(2)]
    r = graft_molecule.REWARDS[added.pop()](mols)
    assert torch.is_tensor(r) and r.shape == (2,) and torch.isfinite(r).all()
