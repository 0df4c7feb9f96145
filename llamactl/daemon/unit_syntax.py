r"""Values written into systemd unit files, escaped so systemd reads back exactly what we meant.

systemd rewrites values as it loads them (systemd.syntax(7), systemd.unit(5) "Specifiers", systemd.service(5)
"Command lines"):
- `%x` is a specifier in nearly every setting (`%h` is the home directory, `%20` is an error and the whole
  setting is dropped with a warning): a literal `%` is written `%%`;
- in ExecStart= arguments after the program, `$NAME` and `${NAME}` are environment variables: a literal `$`
  is written `$$` (the program path itself is not expanded, so there `$` stays);
- quoted items ("...") take C-style escapes: `\\`, `\"`, and `\xNN` for control characters;
- there are no trailing comments: `#` inside a value is part of the value, so comments go on lines of their own.
Settings that take a plain path (EnvironmentFile=) have no quoting at all, and systemd refuses to run a program
whose path holds a quote, a backslash or a control character ("Executable name contains special characters"):
what a unit cannot hold is refused here with a sentence, not written for systemd to drop.
"""

from __future__ import annotations

from llamactl.errors import ConfigError

_PLAIN = frozenset("abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789/._-=:@+,")


def escape_specifiers(value: str) -> str:
    return value.replace("%", "%%")


def _c_escape(value: str) -> str:
    out = []
    for ch in value:
        if ch in '\\"':
            out.append("\\" + ch)
        elif ord(ch) < 0x20 or ord(ch) == 0x7F:
            out.append(f"\\x{ord(ch):02x}")
        else:
            out.append(ch)
    return "".join(out)


def quoted(value: str, *, specifiers: bool = True, variables: bool = False) -> str:
    """One item of a quoting setting (Environment=, ExecStart=, ReadWritePaths=). `specifiers=False` keeps `%`
    as written (a value that uses specifiers on purpose); `variables=True` escapes `$` (ExecStart= arguments)."""
    if specifiers:
        value = escape_specifiers(value)
    if variables:
        value = value.replace("$", "$$")
    if value and all(c in _PLAIN or (c == "%" and not specifiers) for c in value):
        return value
    return '"' + _c_escape(value) + '"'


def command_line(argv: tuple[str, ...] | list[str], *, specifiers: bool = True) -> str:
    """ExecStart=/ExecStartPre= value: the program (specifiers escaped, `$` literal there) then its arguments."""
    program, *args = argv
    if any(c in "\\\"'" or ord(c) < 0x20 or ord(c) == 0x7F for c in program):
        raise ConfigError(f"ExecStart: systemd cannot run the program {program!r}: its path holds a quote, a "
                          "backslash or a control character",
                          hint="install llamactl (its virtual environment) under a path without those characters")
    return " ".join([quoted(program, specifiers=specifiers),
                     *(quoted(a, specifiers=specifiers, variables=True) for a in args)])


def environment_item(key: str, value: str, *, specifiers: bool = True) -> str:
    """One `KEY=value` item of Environment= (no `$` expansion there, so `$` stays)."""
    return quoted(f"{key}={value}", specifiers=specifiers)


def plain_path(value: str, setting: str, *, specifiers: bool = True) -> str:
    """A path for a setting without quoting (EnvironmentFile=): it takes the rest of the line as it is, minus
    the whitespace at either end, so a path with a control character or that whitespace cannot be written."""
    if any(ord(c) < 0x20 or ord(c) == 0x7F for c in value) or value != value.strip():
        raise ConfigError(f"{setting}: the path {value!r} cannot be written into a systemd unit (it holds a "
                          "control character, or whitespace at an end)",
                          hint="move llamactl's config directory (LLAMACTL_HOME or XDG_CONFIG_HOME) to a plainer path")
    return escape_specifiers(value) if specifiers else value
