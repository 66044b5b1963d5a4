"""What a command's configs offer, for people (`--help`), shells (completion) and start-up checks.

Hydra's own help lists every group it finds (the method group under pretrain, the internal arch
group) and loses the YAML comments; its shell completion cannot parse `bigml <command> ...`. This
module reads the same files: the groups a command's defaults list uses (conf/<command>.yaml and
conf/common.yaml), their presets, and the keys of the composed config with the comment that
follows each in its YAML file.

    render_help(command)            the text of `bigml <command> --help`
    complete(line)                  candidates for the word being typed (bigml __complete "<line>")
    completion_script(shell)        the bash / zsh function (bigml completion bash|zsh)
    check_choices(command, cfg)     refuse presets the command does not use, at once
"""

from __future__ import annotations

import re
from functools import lru_cache
from pathlib import Path

import yaml

from bigml.commands import COMMANDS
from bigml.errors import ConfigError, UsageError, did_you_mean

INTERNAL_GROUPS = {"arch", "hydra"}  # composed by presets (model -> arch), never chosen on the command line
_COMMENT = re.compile(r"^(\s*)([\w.+-]+):\s*(.*?)\s*(?:#\s?(.*))?$")


@lru_cache(maxsize=1)
def conf_dir() -> Path:
    from importlib.resources import files

    return Path(str(files("bigml.conf")))


def _defaults(path: Path) -> list:
    if not path.exists():
        return []
    return (yaml.safe_load(path.read_text()) or {}).get("defaults", []) or []


def command_groups(command: str) -> dict[str, str | None]:
    """group -> default preset (None: optional, off by default) for the groups the command uses."""
    out: dict[str, str | None] = {}
    for entry in _defaults(conf_dir() / "common.yaml") + _defaults(conf_dir() / f"{command}.yaml"):
        if isinstance(entry, dict):
            for key, value in entry.items():
                key = str(key)
                if key.startswith(("override ", "/hydra", "hydra/")) or key.lstrip("/") in INTERNAL_GROUPS:
                    continue
                out[key.removeprefix("optional ").lstrip("/")] = value if isinstance(value, str) else None
    return out


def presets(command: str, group: str) -> list[str]:
    """The presets of `group` that `command` accepts."""
    found = sorted(p.stem for p in (conf_dir() / group).glob("*.yaml"))
    allowed = COMMANDS[command].presets.get(group)
    kinds = COMMANDS[command].data_kinds if group == "data" else ()
    return [p for p in found if (allowed is None or p in allowed) and (not kinds or data_kind(p) in kinds)]


def data_kind(preset: str) -> str | None:
    """The `kind` of a data preset, following its defaults list (tweets inherits labeled's)."""
    path = conf_dir() / "data" / f"{preset}.yaml"
    if not path.exists():
        return None
    data = yaml.safe_load(path.read_text()) or {}
    if "kind" in data:
        return str(data["kind"])
    for entry in data.get("defaults", []) or []:
        if isinstance(entry, str) and entry != "_self_":
            return data_kind(entry)
    return None


def check_choices(command: str, choices: dict, cfg) -> None:
    """Refuse, before any work, a preset of a group the command shares but does not use
    (finetune method=quantize) and data of a kind it cannot read (pretrain data=tweets)."""
    spec = COMMANDS[command]
    for group, allowed in spec.presets.items():
        choice = choices.get(group)
        if choice is not None and choice not in allowed:
            raise ConfigError(group, f"{choice!r} is not a {command} {group}{did_you_mean(str(choice), allowed)}",
                              f"choose one of {', '.join(allowed)}")
    data = cfg.get("data") if cfg is not None else None
    if spec.data_kinds and data is not None and data.get("kind") and str(data.get("kind")) not in spec.data_kinds:
        fitting = [p for p in presets(command, "data") if data_kind(p) in spec.data_kinds]
        raise ConfigError("data", f"data={choices.get('data') or data.get('name')} holds {data.get('kind')} data, "
                          f"which bigml {command} does not read",
                          f"choose one of {', '.join(fitting)} (with data.path=... for your own files)")


# -- comments of the YAML files ---------------------------------------------------------------

def yaml_comments(path: Path, prefix: str = "") -> dict[str, str]:
    """dotted key -> the comment on its line, for one YAML file (nesting followed by indentation)."""
    out: dict[str, str] = {}
    stack: list[tuple[int, str]] = []
    if not path.exists():
        return out
    text = path.read_text()
    if any(line.strip() == "# @package _global_" for line in text.splitlines()[:3]):
        prefix = ""  # the file's keys sit at the root of the config
    for line in text.splitlines():
        if not line.strip() or line.lstrip().startswith(("#", "-")):
            continue
        m = _COMMENT.match(line)
        if not m:
            continue
        indent, key, value, comment = len(m.group(1)), m.group(2), m.group(3), m.group(4)
        while stack and stack[-1][0] >= indent:
            stack.pop()
        dotted = ".".join([*(k for _, k in stack), key])
        if key != "defaults" and comment:
            out[f"{prefix}{dotted}"] = comment.strip()
        if value == "" or value.startswith("#"):
            stack.append((indent, key))
    return out


def _preset_files(group: str, preset: str) -> list[Path]:
    """A preset file and the files its defaults list pulls in (model presets extend /arch/...)."""
    path = conf_dir() / group / f"{preset}.yaml"
    files = []
    for entry in _defaults(path):
        if isinstance(entry, str) and entry != "_self_":
            ref = entry.split("@")[0]
            files += [conf_dir() / f"{ref.lstrip('/')}.yaml"] if ref.startswith("/") else _preset_files(group, ref)
    return [*files, path]


def key_docs(command: str, overrides: list[str] | None = None) -> list[tuple[str, str, str]]:
    """(dotted key, default value, comment) of every key of the composed config."""
    cfg, choices = compose(command, overrides or [])
    comments: dict[str, str] = {}
    comments.update(yaml_comments(conf_dir() / "common.yaml"))
    comments.update(yaml_comments(conf_dir() / f"{command}.yaml"))
    for group, preset in choices.items():
        if preset is None or group.startswith("hydra"):
            continue
        for f in _preset_files(group, preset):
            comments.update({k: v for k, v in yaml_comments(f, f"{group}.").items() if k not in comments or group != "arch"})
    from omegaconf import OmegaConf

    rows = []

    def walk(node, prefix: str) -> None:
        for key, value in node.items():
            if isinstance(value, dict) and value:
                walk(value, f"{prefix}{key}.")
            else:
                rows.append((f"{prefix}{key}", _show(value), comments.get(f"{prefix}{key}", "")))

    walk(OmegaConf.to_container(cfg, resolve=False), "")
    return rows


def _show(value) -> str:
    if value is None:
        return "null"
    if isinstance(value, bool):
        return str(value).lower()
    return str(value)


def compose(command: str, overrides: list[str]):
    """(the composed config without hydra's node, the group choices) of `command` with `overrides`."""
    from hydra import compose as hydra_compose
    from hydra import initialize_config_dir
    from hydra.core.global_hydra import GlobalHydra
    from omegaconf import open_dict

    from bigml import resolvers

    resolvers.register()
    fresh = not GlobalHydra.instance().is_initialized()
    if not fresh:
        GlobalHydra.instance().clear()
    with initialize_config_dir(config_dir=str(conf_dir()), version_base="1.3"):
        cfg = hydra_compose(command, overrides, return_hydra_config=True)
    choices = {k: v for k, v in cfg.hydra.runtime.choices.items() if not k.startswith("hydra")}
    with open_dict(cfg):
        del cfg["hydra"]
    return cfg, choices


# -- --help ------------------------------------------------------------------------------------

def render_help(command: str, overrides: list[str] | None = None) -> str:
    spec = COMMANDS[command]
    lines = [f"bigml {command}: {spec.summary}", "",
             f"usage: bigml {command} [group=preset ...] [key=value ...] [+key=value] [-m] [--cfg job]", ""]
    lines.append("config groups (group=preset; * marks the default):")
    for group, default in command_groups(command).items():
        names = [f"{p}*" if p == default else p for p in presets(command, group)]
        lines.append(f"  {group:<15}" + ", ".join(names) + ("  (optional)" if default is None else ""))
    lines += ["", "keys (key=value) with their defaults:"]
    rows = key_docs(command, overrides)
    keyw = 44
    for key, value, doc in rows:
        left = f"  {key}={value}"
        if not doc:
            lines.append(left)
        elif len(left) < keyw:
            lines.append(f"{left:<{keyw}}{doc}")
        else:
            lines += [left, f"{'':<{keyw}}{doc}"]
    lines += ["", "`--cfg job` prints the composed config; `+key=value` adds a key the config does not have;",
              "`bigml completion bash|zsh` prints shell completion. Exit codes: 0 ok, 1 runtime failure, 2 usage error."]
    return "\n".join(lines) + "\n"


# -- shell completion -----------------------------------------------------------------------------

def complete(line: str) -> list[str]:
    """Candidates for the last word of `line` (what the shell has typed up to the cursor). When the
    word holds `=`, only the part after it is completed: shells split words at `=`."""
    words = line.split()
    current = "" if line.endswith((" ", "\t")) or not words else words[-1]
    done = words[1:] if current == "" else words[1:-1]  # words[0] is the program
    if not done:
        return sorted(c for c in [*COMMANDS, "completion", "--help", "--version"] if c.startswith(current))
    command = done[0]
    if command == "completion":
        return [s for s in ("bash", "zsh") if s.startswith(current)]
    if command not in COMMANDS:
        return []
    groups = command_groups(command)
    if "=" in current:
        key, _, partial = current.partition("=")
        key = key.lstrip("+~")
        if key in groups:
            return [p for p in presets(command, key) if p.startswith(partial)]
        if partial == "" or "true".startswith(partial) or "false".startswith(partial):
            docs = {k: v for k, v, _ in _key_docs_safe(command, done[1:])}
            if docs.get(key) in ("true", "false"):
                return [b for b in ("true", "false") if b.startswith(partial)]
        return []
    candidates = [f"{g}=" for g in groups] + [f"{k}=" for k, _, _ in _key_docs_safe(command, done[1:])]
    candidates += ["--help", "--cfg", "-m"]
    return sorted({c for c in candidates if c.startswith(current)})


def _key_docs_safe(command: str, typed: list[str]) -> list[tuple[str, str, str]]:
    """Keys of the config with the group choices typed so far (anything that does not compose is ignored)."""
    groups = command_groups(command)
    chosen = [w for w in typed if "=" in w and w.split("=", 1)[0] in groups]
    try:
        return key_docs(command, chosen)
    except Exception:  # noqa: BLE001 - a half-typed command line: complete from the defaults
        try:
            return key_docs(command, [])
        except Exception:  # noqa: BLE001
            return []


BASH = """# bigml shell completion (bash). Load it with:  source <(bigml completion bash)
_bigml_complete() {
    local IFS=$'\\n'
    COMPREPLY=($(bigml __complete "${COMP_LINE:0:$COMP_POINT}" 2>/dev/null))
    # a key (trainer.max_steps=) or a group (model=) ends with '=': no space after it
    if [[ ${#COMPREPLY[@]} -eq 1 && "${COMPREPLY[0]}" == *= ]]; then compopt -o nospace 2>/dev/null; fi
}
complete -F _bigml_complete bigml
"""

ZSH = """# bigml shell completion (zsh). Load it with:  source <(bigml completion zsh)
(( $+functions[compdef] )) || { autoload -U +X compinit && compinit -u; }
autoload -U +X bashcompinit && bashcompinit
""" + BASH.split("\n", 1)[1]


def completion_script(shell: str) -> str:
    scripts = {"bash": BASH, "zsh": ZSH}
    if shell not in scripts:
        raise UsageError(f"completion {shell}: no such shell; choose bash or zsh (source <(bigml completion bash))")
    return scripts[shell]
