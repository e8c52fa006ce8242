#!/usr/bin/env python3
"""Checks the Nextflow module and pipeline here without Nextflow, which this project's machines
cannot install (it downloads its own runtime at first start).

What it checks:
1. The files are present; main.nf includes and calls the module; nextflow.config has the
   docker, singularity, apptainer and gpu profiles.
2. The module's `script:` block, rendered the way Nextflow would for sample tasks (the `def`
   lines, ${...} interpolation, escapes, indentation), yields a chimap command whose every
   option and value the Boutiques descriptor accepts; `bosh exec simulate` on the same
   invocation gives the same command (same positionals, options and values).
3. With --run (and chimap on PATH): the rendered script and stub run with bash in a task
   folder laid out as Nextflow stages it (bids_dir linked as `bids`), on bids/example, and every
   output the module declares is there.

Usage: check_module.py [--run] [--bosh PATH]
"""

import argparse
import glob
import json
import re
import shlex
import shutil
import subprocess
import sys
import tempfile
import textwrap
from pathlib import Path

HERE = Path(__file__).resolve().parent
REPO = HERE.parents[1]
DESCRIPTOR = REPO / "descriptors" / "chimap.boutiques.json"
MODULE = HERE / "modules" / "chimap" / "main.nf"

# Sample tasks: the values of the Groovy expressions the module's script uses.
SCENARIOS = {
    "defaults": {
        "meta.id": "1",
        "meta.session": None,
        "config": None,
        "task.ext.args": None,
        "task.cpus": 2,
        "task.process": "CHIMAP",
        "bids_dir": "bids",
    },
    "session, config and extra arguments": {
        "meta.id": "2",
        "meta.session": "01",
        "config": "qsm.yaml",
        "task.ext.args": "--method tkd --overwrite",
        "task.cpus": 4,
        "task.process": "CHIMAP",
        "bids_dir": "bids",
    },
    "config, run for real": {
        "meta.id": "2",
        "meta.session": None,
        "config": "qsm.yaml",
        "task.ext.args": "--overwrite",
        "task.cpus": 2,
        "task.process": "CHIMAP",
        "bids_dir": "bids",
    },
}


class CheckError(Exception):
    pass


def check(cond, msg):
    if not cond:
        raise CheckError(msg)


# ---------------------------------------------------------------- 1. presence


def check_presence():
    for rel in ["main.nf", "nextflow.config", "modules/chimap/main.nf", "modules/chimap/meta.yml"]:
        check((HERE / rel).is_file(), f"descriptors/nextflow/{rel} is missing")
    main = (HERE / "main.nf").read_text()
    check(
        re.search(r"include\s*\{\s*CHIMAP\s*\}\s*from\s*'\./modules/chimap/main'", main),
        "main.nf does not include CHIMAP from ./modules/chimap/main",
    )
    check(re.search(r"\bCHIMAP\s*\(", main), "main.nf does not call CHIMAP")
    config = (HERE / "nextflow.config").read_text()
    profiles = re.search(r"^profiles\s*\{(.*)^\}", config, re.S | re.M)
    check(profiles, "nextflow.config has no profiles block")
    for name in ["docker", "singularity", "apptainer", "gpu"]:
        check(
            re.search(rf"^\s*{name}\s*\{{", profiles.group(1), re.M),
            f"nextflow.config has no {name} profile",
        )
    check("--nv" in profiles.group(1), "the gpu profile does not pass --nv to apptainer/singularity")
    module = MODULE.read_text()
    check(re.search(r"^process\s+CHIMAP\s*\{", module, re.M), "the module defines no process CHIMAP")
    for emit in ["maps", "description", "versions"]:
        check(f"emit: {emit}" in module, f"the module emits no {emit}")


# ---------------------------------------------------------------- 2. rendering


def section(text, name, following):
    """The Groovy text of a process section (`script:`), up to the next one or the end."""
    m = re.search(rf"^\s*{name}:\s*$(.*?)^\s*(?:{following}):\s*$", text, re.S | re.M)
    check(m, f"no {name}: section in {MODULE.name}")
    return m.group(1)


def lookup(expr, env):
    check(expr in env, f"the checker does not know the Groovy expression `{expr}`; teach it")
    return env[expr]


def interpolate(gstring, env):
    def value(m):
        v = lookup(m.group(1).strip(), env)
        return "" if v is None else str(v)

    return re.sub(r"\$\{([^}]*)\}", value, gstring)


def evaluate_defs(block, env):
    """The `def NAME = ...` lines of a script block, in the two forms the module uses."""
    env = dict(env)
    for line in block.splitlines():
        line = line.strip()
        if not line.startswith("def "):
            continue
        m = re.fullmatch(r"def (\w+) = ([\w.]+) \?: '([^']*)'", line)
        if m:
            v = lookup(m.group(2), env)
            env[m.group(1)] = v if v else m.group(3)
            continue
        m = re.fullmatch(r"def (\w+) = ([\w.]+) \? \"([^\"]*)\" : '([^']*)'", line)
        if m:
            cond = lookup(m.group(2), env)
            env[m.group(1)] = interpolate(m.group(3), env) if cond else m.group(4)
            continue
        raise CheckError(f"the checker does not understand `{line}`; teach it")
    return env


def render(block, env):
    """The shell script Nextflow would write for this block and task."""
    env = evaluate_defs(block, env)
    m = re.search(r'"""\n(.*?)"""', block, re.S)
    check(m, "no triple-quoted script in the block")
    text = interpolate(m.group(1), env)
    # Groovy escapes in a GString: \\ is one backslash, \$ a literal dollar.
    text = text.replace("\\\\", "\x00").replace("\\$", "$").replace("\x00", "\\")
    return textwrap.dedent(text)


def chimap_command(script):
    """The first command of the script, with line continuations joined."""
    lines = iter(script.splitlines())
    command = next(line for line in lines if line.strip())
    while command.rstrip().endswith("\\"):
        command = command.rstrip()[:-1] + " " + next(lines)
    return shlex.split(command)


# ---------------------------------------------------------------- descriptor


def parse_with_descriptor(argv, desc):
    """Positionals and options of a chimap command line, checked against the descriptor."""
    check(argv and argv[0] == "chimap", f"not a chimap command: {argv}")
    by_flag = {i["command-line-flag"]: i for i in desc["inputs"] if "command-line-flag" in i}
    positional_inputs = [i for i in desc["inputs"] if "command-line-flag" not in i]
    # In the order of the descriptor's command-line template.
    template = desc["command-line"]
    positional_inputs.sort(key=lambda i: template.index(i["value-key"]))
    invocation, positionals, rest = {}, [], argv[1:]
    while rest:
        tok = rest.pop(0)
        if not tok.startswith("-"):
            positionals.append(tok)
            continue
        check(tok in by_flag, f"`{tok}` is not an option of the Boutiques descriptor")
        inp = by_flag[tok]
        if inp["type"] == "Flag":
            invocation[inp["id"]] = True
            continue
        values = []
        while rest and not rest[0].startswith("--"):
            values.append(rest.pop(0))
            if not inp.get("list"):
                break
        check(values, f"`{tok}` has no value")
        for v in values:
            validate_value(inp, v)
        invocation[inp["id"]] = values if inp.get("list") else convert(inp, values[0])
    check(
        len(positionals) == len(positional_inputs),
        f"{len(positionals)} positionals {positionals}, the descriptor has {len(positional_inputs)}",
    )
    for inp, v in zip(positional_inputs, positionals):
        validate_value(inp, v)
        invocation[inp["id"]] = v
    return invocation


def convert(inp, v):
    if inp["type"] == "Number":
        return int(v) if inp.get("integer") else float(v)
    return v


def validate_value(inp, v):
    name = inp.get("command-line-flag", inp["value-key"])
    if "value-choices" in inp:
        check(v in inp["value-choices"], f"{name} {v}: not one of {inp['value-choices']}")
    if inp["type"] == "Number":
        try:
            x = int(v) if inp.get("integer") else float(v)
        except ValueError:
            raise CheckError(f"{name} {v}: not a{'n integer' if inp.get('integer') else ' number'}")
        if "minimum" in inp:
            check(x >= inp["minimum"], f"{name} {v}: below the minimum {inp['minimum']}")


def bosh_command(bosh, invocation, tmp):
    path = Path(tmp) / "invocation.json"
    path.write_text(json.dumps(invocation))
    done = subprocess.run(
        [bosh, "exec", "simulate", str(DESCRIPTOR), "-i", str(path)],
        capture_output=True,
        text=True,
    )
    check(done.returncode == 0, f"bosh exec simulate failed:\n{done.stdout}{done.stderr}")
    lines = [line for line in done.stdout.splitlines() if line.startswith("chimap ")]
    check(len(lines) == 1, f"no command in bosh's output:\n{done.stdout}")
    return shlex.split(lines[0])


def with_defaults(invocation, desc):
    out = dict(invocation)
    for inp in desc["inputs"]:
        if "default-value" in inp and inp["id"] not in out:
            out[inp["id"]] = inp["default-value"]
    return out


# ---------------------------------------------------------------- 3. running


def declared_outputs(module):
    block = section(module, "output", "when|script")
    return re.findall(r'path\(?\s*"([^"]+)"', block)


def run_task(block, env, module, label):
    with tempfile.TemporaryDirectory(prefix="chimap-nf-task-") as task:
        task = Path(task)
        (task / "bids").symlink_to(REPO / "bids" / "example")
        if env.get("config"):
            cfg = subprocess.run(["chimap", "config", "--default"], capture_output=True, text=True)
            check(cfg.returncode == 0, f"chimap config --default failed: {cfg.stderr}")
            (task / env["config"]).write_text(cfg.stdout)
        script = render(block, env)
        (task / ".command.sh").write_text(script)
        # Nextflow's default shell.
        done = subprocess.run(["bash", "-ue", ".command.sh"], cwd=task, capture_output=True, text=True)
        check(done.returncode == 0, f"{label}: the task failed:\n{script}\n{done.stderr[-3000:]}")
        for pattern in declared_outputs(module):
            check(glob.glob(str(task / pattern)), f"{label}: declared output {pattern} is missing")
        versions = (task / "versions.yml").read_text()
        check(
            re.search(r'^"CHIMAP":\n\s+chimap: \d+\.\d+\.\d+\s*$', versions, re.M),
            f"{label}: versions.yml is not nf-core style:\n{versions}",
        )
        if "stub" not in label:
            maps = glob.glob(str(task / f"chimap/sub-{env['meta.id']}/anat/*_Chimap.nii.gz"))
            check(maps, f"{label}: no Chimap for sub-{env['meta.id']}")


# ---------------------------------------------------------------- main


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--run", action="store_true", help="also run the rendered script and stub")
    parser.add_argument("--bosh", default=shutil.which("bosh"), help="the bosh executable")
    args = parser.parse_args()
    check(args.bosh, "bosh is not on PATH (pip install boutiques) and --bosh was not given")

    check_presence()
    print("ok: files, include, profiles")
    desc = json.loads(DESCRIPTOR.read_text())
    module = MODULE.read_text()
    script_block = section(module, "script", "stub")
    with tempfile.TemporaryDirectory() as tmp:
        for label, env in SCENARIOS.items():
            argv = chimap_command(render(script_block, env))
            invocation = parse_with_descriptor(argv, desc)
            check(
                invocation.get("participant_label") == [env["meta.id"]],
                f"{label}: --participant-label is not meta.id",
            )
            check(invocation.get("nthreads") == env["task.cpus"], f"{label}: --nthreads is not task.cpus")
            if env["meta.session"]:
                check(invocation.get("session_label") == [env["meta.session"]], f"{label}: no session")
            if env["config"]:
                check(invocation.get("config") == env["config"], f"{label}: no --config")
            via_bosh = parse_with_descriptor(bosh_command(args.bosh, invocation, tmp), desc)
            check(
                via_bosh == with_defaults(invocation, desc),
                f"{label}: the module's command and bosh's differ:\n  module: {argv}\n  bosh:   {via_bosh}",
            )
            print(f"ok: {label}: {shlex.join(argv)}")
    if args.run:
        check(shutil.which("chimap"), "--run needs chimap on PATH")
        stub_block = stub_section(module)
        for label in ["defaults", "config, run for real"]:
            run_task(script_block, SCENARIOS[label], module, f"run: {label}")
            print(f"ok: ran the task ({label}) on bids/example; declared outputs present")
        run_task(stub_block, SCENARIOS["defaults"], module, "stub")
        print("ok: ran the stub; declared outputs present")


def stub_section(module):
    m = re.search(r"^\s*stub:\s*$(.*)^\}", module, re.S | re.M)
    check(m, "the module has no stub: section")
    return m.group(1)


if __name__ == "__main__":
    try:
        main()
    except CheckError as e:
        sys.exit(f"check_module.py: FAILED: {e}")
