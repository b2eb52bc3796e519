"""A model of GRUB running the ``grub.cfg`` found on the ESP: an interpreter, not a copy.

Decision: rather than re-state the boot scheme in Python (which could drift from the script
the backend installs), this model *executes* the installed ``grub.cfg`` with a small
interpreter of the part of GRUB's script language that it uses. The model and the script then
cannot disagree; whether the script implements the scheme is checked by the tests against a
separate statement of the scheme. The interpreter refuses anything outside its subset (an
unknown command or construct raises :class:`GrubModelError`) rather than guess.

Written from the GRUB manual (2.06):

- "Writing full configuration files directly" (Shell-like scripting): words and the
  metacharacters ``{ } | & $ ; < >``; comments; the three quoting mechanisms (backslash,
  single quotes, double quotes in which ``$`` and ``\\`` stay special); ``$name`` and
  ``${name}`` expansion; reserved words; ``if list; then list; [elif list; then list;]...
  [else list;] fi``; ``for name in word...; do list; done``; the exit status of the last
  command as the condition; ``menuentry``.
- "Special environment variables": ``default`` (an entry number, title or ``--id``; one
  that names no entry means entry 0), ``fallback`` (entries tried in turn when the default
  fails to boot), ``timeout`` (0 boots at once), ``config_directory`` and ``config_file``
  (set to the configuration being read), ``root``. Where the manual and GRUB 2.06 differ, the
  model follows GRUB, which the QEMU tier runs: the manual says ``fallback`` identifies entries
  "in the same way as for default", but GRUB's menu code (``normal/menu.c``) reads it as a
  list of entry *numbers* only; at the first word that is not a number the list ends, so an
  id or a title there means no fallback at all, and GRUB stops at its menu.
- "The GRUB environment block", "load_env" (``--file``; names given are a whitelist) and
  "save_env" (saves the named variables; an unset one is removed from the block). GRUB writes
  the block in place, sector by sector, never growing or moving it: here
  :func:`fleet_core.durable.rewrite_in_place`. A file that cannot be read, or that does not
  start with the signature line, makes ``load_env`` fail and loads nothing; a full block makes
  ``save_env`` fail and writes nothing.
- The block itself, as GRUB's ``grub-core/lib/envblk.c`` reads and changes it (the same code
  ``grub-editenv`` runs, which the integration tests compare this model with): the signature
  ``# GRUB Environment Block\\n``, then lines; a line starting with ``#`` is skipped; any other
  is ``name=value``, the name running to the first ``=``, the value to the first newline not
  escaped by a backslash (a backslash makes the next byte literal). GRUB stops reading at the
  first line that has no ``=`` or no end before the end of the file, keeping what it read
  before; names and values are C strings, so they end at a NUL byte. The file may have any
  size that holds the signature and one more byte: GRUB reads it whole. ``save_env`` changes
  the block in a buffer (``grub_envblk_set``: a known name's value is replaced where it stands,
  moving the rest and the ``#`` padding; a new name is appended after the last line; a
  backslash or a newline in a value is written with a backslash before it;
  ``grub_envblk_delete`` closes the gap), fails without writing when a change does not fit or
  the padding does not follow a newline, and writes the buffer back whole.

- "Commands": ``set``, ``[``/``test`` (``=``, ``!=``), ``linux`` (the kernel gets
  ``BOOT_IMAGE=<file>`` before its arguments) and ``initrd``.
- GRUB keeps nothing across boots but what is on disk, so every :class:`BootCause` behaves
  alike.

Known simplifications: paths on the ESP are files under ``esp_dir``; the kernels on other
partitions are not files here, ``kernel_present`` says whether one loads. The model reads and
writes the block with its own code and does not import the backend (``bootloader_hooks.grub``)
or its block codec (``bootloader_hooks.grubenv``): a mistake there must not be mirrored here.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path

from bootloader_hooks.base import ALL_SLOTS, ROOT_SLOTS, BootEvent, BootOutcome
from bootloader_hooks.errors import BootloaderError
from fleet_core import durable

_WHO = "grub model"


class GrubModelError(BootloaderError):
    """The script uses something the model does not know, or GRUB would stop at its menu."""


# ---------------------------------------------------------------------------------------------
# Words and tokens.


@dataclass(frozen=True)
class _Part:
    """A piece of a word: literal text or a variable, quoted (no field splitting) or not."""

    text: str
    is_var: bool
    quoted: bool


@dataclass(frozen=True)
class _Word:
    parts: tuple[_Part, ...]

    def literal(self) -> str | None:
        """The word's text if it is one unquoted literal (how reserved words are recognised)."""
        if len(self.parts) == 1 and not self.parts[0].is_var and not self.parts[0].quoted:
            return self.parts[0].text
        return None


_NEWLINE, _SEMICOLON = "\n", ";"
_SEPARATORS = (_NEWLINE, _SEMICOLON)
_OPEN, _CLOSE = "{", "}"
_Token = _Word | str
_BLANKS = " \t"
_NAME_CHARS = "ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789_"


class _Lexer:
    def __init__(self, text: str) -> None:
        self.text = text
        self.pos = 0

    def error(self, message: str) -> GrubModelError:
        line = self.text.count("\n", 0, self.pos) + 1
        return GrubModelError(f"{_WHO}: grub.cfg line {line}: {message}")

    def tokens(self) -> list[_Token]:
        tokens: list[_Token] = []
        while self.pos < len(self.text):
            char = self.text[self.pos]
            if char in _BLANKS:
                self.pos += 1
            elif char == "\\" and self.text.startswith("\\\n", self.pos):
                self.pos += 2  # line continuation
            elif char == "#":
                end = self.text.find("\n", self.pos)
                self.pos = len(self.text) if end < 0 else end
            elif char in _SEPARATORS or char in "{}":
                tokens.append(char)
                self.pos += 1
            elif char in "|&<>":
                raise self.error(f"{char!r} is outside the subset this model runs")
            else:
                tokens.append(self.word())
        return tokens

    def word(self) -> _Word:
        parts: list[_Part] = []
        while self.pos < len(self.text):
            char = self.text[self.pos]
            if char in _BLANKS or char in "\n;{}|&<>":
                break
            if char == "\\":
                if self.pos + 1 >= len(self.text):
                    raise self.error("backslash at end of file")
                if self.text[self.pos + 1] != "\n":
                    parts.append(_Part(self.text[self.pos + 1], False, True))
                self.pos += 2
            elif char == "'":
                end = self.text.find("'", self.pos + 1)
                if end < 0:
                    raise self.error("unterminated single quote")
                parts.append(_Part(self.text[self.pos + 1 : end], False, True))
                self.pos = end + 1
            elif char == '"':
                self.pos += 1
                parts += self.double_quoted()
            elif char == "$":
                parts.append(_Part(self.variable(), True, False))
            else:
                parts.append(_Part(char, False, False))
                self.pos += 1
        return _Word(tuple(_merge(parts)))

    def double_quoted(self) -> list[_Part]:
        parts: list[_Part] = []
        while True:
            if self.pos >= len(self.text):
                raise self.error("unterminated double quote")
            char = self.text[self.pos]
            if char == '"':
                self.pos += 1
                # An empty "" still makes a word.
                return parts or [_Part("", False, True)]
            if char == "\\" and self.text[self.pos + 1 : self.pos + 2] in ("$", '"', "\\", "\n"):
                escaped = self.text[self.pos + 1]
                if escaped != "\n":
                    parts.append(_Part(escaped, False, True))
                self.pos += 2
            elif char == "$":
                parts.append(_Part(self.variable(), True, True))
            else:
                parts.append(_Part(char, False, True))
                self.pos += 1

    def variable(self) -> str:
        self.pos += 1  # the '$'
        if self.text.startswith("{", self.pos):
            end = self.text.find("}", self.pos)
            if end < 0:
                raise self.error("unterminated ${")
            name = self.text[self.pos + 1 : end]
            self.pos = end + 1
        else:
            start = self.pos
            while self.pos < len(self.text) and self.text[self.pos] in _NAME_CHARS:
                self.pos += 1
            name = self.text[start : self.pos]
        if not name or any(char not in _NAME_CHARS for char in name):
            raise self.error(f"variable name {name!r} is outside the subset this model runs")
        return name


def _merge(parts: list[_Part]) -> list[_Part]:
    """Join neighbouring literal characters of the same quoting into one part."""
    merged: list[_Part] = []
    for part in parts:
        last = merged[-1] if merged else None
        if last and not part.is_var and not last.is_var and last.quoted == part.quoted:
            merged[-1] = _Part(last.text + part.text, False, part.quoted)
        else:
            merged.append(part)
    return merged


# ---------------------------------------------------------------------------------------------
# Commands.


@dataclass(frozen=True)
class _Simple:
    words: tuple[_Word, ...]
    line: int


@dataclass(frozen=True)
class _If:
    branches: tuple[tuple[tuple[_Node, ...], tuple[_Node, ...]], ...]
    otherwise: tuple[_Node, ...]


@dataclass(frozen=True)
class _For:
    name: str
    words: tuple[_Word, ...]
    body: tuple[_Node, ...]


@dataclass(frozen=True)
class _Menuentry:
    words: tuple[_Word, ...]
    body: tuple[_Node, ...]


_Node = _Simple | _If | _For | _Menuentry


class _Parser:
    def __init__(self, tokens: list[_Token]) -> None:
        self.tokens = tokens
        self.pos = 0
        self.line = 1

    def error(self, message: str) -> GrubModelError:
        return GrubModelError(f"{_WHO}: grub.cfg near line {self.line}: {message}")

    def peek(self) -> _Token | None:
        return self.tokens[self.pos] if self.pos < len(self.tokens) else None

    def take(self) -> _Token:
        token = self.peek()
        if token is None:
            raise self.error("unexpected end of file")
        self.pos += 1
        if token == _NEWLINE:
            self.line += 1
        return token

    def peek_keyword(self) -> str | None:
        token = self.peek()
        return token.literal() if isinstance(token, _Word) else None

    def expect(self, keyword: str) -> None:
        self.skip_separators()
        token = self.take()
        if not (isinstance(token, _Word) and token.literal() == keyword):
            raise self.error(f"expected {keyword!r}")

    def skip_separators(self) -> None:
        while self.peek() in _SEPARATORS:
            self.take()

    def script(self) -> tuple[_Node, ...]:
        nodes = self.commands(stop=())
        if self.peek() is not None:
            raise self.error(f"unexpected {self.peek()!r}")
        return nodes

    def commands(self, stop: tuple[str, ...]) -> tuple[_Node, ...]:
        nodes: list[_Node] = []
        while True:
            self.skip_separators()
            token = self.peek()
            if token is None or token == _CLOSE or self.peek_keyword() in stop:
                return tuple(nodes)
            nodes.append(self.command())

    def command(self) -> _Node:
        keyword = self.peek_keyword()
        if keyword == "if":
            return self.if_command()
        if keyword == "for":
            return self.for_command()
        if keyword == "menuentry":
            return self.menuentry()
        if keyword in ("then", "elif", "else", "fi", "do", "done", "in"):
            raise self.error(f"unexpected {keyword!r}")
        line = self.line
        words = self.words()
        if self.peek() == _OPEN:
            raise self.error("'{' outside a menuentry")
        return _Simple(words, line)

    def words(self) -> tuple[_Word, ...]:
        words: list[_Word] = []
        while isinstance(token := self.peek(), _Word):
            self.take()
            words.append(token)
        return tuple(words)

    def if_command(self) -> _If:
        self.take()  # if
        branches = []
        while True:
            condition = self.commands(stop=("then",))
            self.expect("then")
            body = self.commands(stop=("elif", "else", "fi"))
            if not condition or not body:
                raise self.error("empty 'if' condition or branch (GRUB rejects it)")
            branches.append((condition, body))
            keyword = self.peek_keyword()
            self.take()
            if keyword == "elif":
                continue
            otherwise: tuple[_Node, ...] = ()
            if keyword == "else":
                otherwise = self.commands(stop=("fi",))
                self.expect("fi")
            elif keyword != "fi":
                raise self.error("expected 'elif', 'else' or 'fi'")
            return _If(tuple(branches), otherwise)

    def for_command(self) -> _For:
        self.take()  # for
        name = self.take()
        if not isinstance(name, _Word) or name.literal() is None:
            raise self.error("'for' needs a variable name")
        self.expect("in")
        words = self.words()
        self.expect("do")
        body = self.commands(stop=("done",))
        self.expect("done")
        return _For(str(name.literal()), words, body)

    def menuentry(self) -> _Menuentry:
        self.take()  # menuentry
        words = self.words()
        if self.take() != _OPEN:
            raise self.error("menuentry needs a '{' block")
        body = self.commands(stop=())
        if self.take() != _CLOSE:
            raise self.error("menuentry block not closed")
        return _Menuentry(words, body)


def parse_script(text: str) -> tuple[_Node, ...]:
    """Parse GRUB script ``text`` into commands.

    Raises:
        GrubModelError: a syntax error, or a construct outside the model's subset.
    """
    return _Parser(_Lexer(text).tokens()).script()


# ---------------------------------------------------------------------------------------------
# Running a script.


@dataclass(frozen=True)
class _Entry:
    title: str
    entry_id: str | None
    body: tuple[_Node, ...]


@dataclass
class _Loaded:
    """What an entry's body loaded: the kernel and its arguments."""

    kernel: str | None = None
    args: tuple[str, ...] = ()


@dataclass
class _Machine:
    """One run of GRUB: its variables, its menu, and access to the ESP."""

    model: GrubModel
    env: dict[str, str]
    entries: list[_Entry] = field(default_factory=list)
    loaded: _Loaded | None = None  # set while a menu entry runs
    env_file: Path | None = None  # the block load_env last read, for the trial flag

    def run(self, nodes: tuple[_Node, ...]) -> int:
        status = 0
        for node in nodes:
            status = self.execute(node)
        return status

    def execute(self, node: _Node) -> int:
        if isinstance(node, _Simple):
            argv = self.expand(node.words)
            return self.call(argv, node.line) if argv else 0
        if isinstance(node, _If):
            for condition, body in node.branches:
                if self.run(condition) == 0:
                    return self.run(body)
            return self.run(node.otherwise)
        if isinstance(node, _For):
            status = 0
            for value in self.expand(node.words):
                self.env[node.name] = value
                status = self.run(node.body)
            return status
        self.add_entry(node)
        return 0

    def expand(self, words: tuple[_Word, ...]) -> list[str]:
        """Expand words to fields: unquoted variables are split at blanks, as GRUB does."""
        fields: list[str] = []
        for word in words:
            current: str | None = None
            for part in word.parts:
                if not part.is_var:
                    current = (current or "") + part.text
                    continue
                value = self.env.get(part.text, "")
                if part.quoted:
                    current = (current or "") + value
                    continue
                pieces = value.split()
                if not pieces:
                    continue
                if value[:1].isspace() and current is not None:
                    fields.append(current)
                    current = None
                current = (current or "") + pieces[0]
                for piece in pieces[1:]:
                    fields.append(current)
                    current = piece
                if value[-1:].isspace():
                    fields.append(current)
                    current = None
            if current is not None:
                fields.append(current)
        return fields

    def call(self, argv: list[str], line: int) -> int:
        command, args = argv[0], argv[1:]
        handlers: dict[str, Callable[[list[str]], int]] = {
            "set": self.cmd_set,
            "[": self.cmd_test,
            "load_env": self.cmd_load_env,
            "save_env": self.cmd_save_env,
            "linux": self.cmd_linux,
            "initrd": self.cmd_initrd,
        }
        handler = handlers.get(command)
        if handler is None:
            raise GrubModelError(
                f"{_WHO}: grub.cfg near line {line}: command {command!r} is outside the subset"
            )
        return handler(args)

    def cmd_set(self, args: list[str]) -> int:
        if len(args) != 1 or "=" not in args[0]:
            raise GrubModelError(f"{_WHO}: only 'set NAME=VALUE' is modelled, not {args!r}")
        name, value = args[0].split("=", 1)
        self.env[name] = value
        return 0

    def cmd_test(self, args: list[str]) -> int:
        if len(args) != 4 or args[3] != "]" or args[1] not in ("=", "!="):
            raise GrubModelError(f"{_WHO}: only '[ A = B ]' and '[ A != B ]' are modelled")
        equal = args[0] == args[2]
        return 0 if equal == (args[1] == "=") else 1

    def file_option(self, args: list[str]) -> tuple[Path | None, list[str]]:
        """Split ``--file F`` / ``-f F`` off ``args``; the ESP path it names, or None."""
        if args[:1] in (["--file"], ["-f"]) and len(args) >= 2:
            return self.model.esp_file(args[1], self.env), args[2:]
        if args[:1] and args[0].startswith("--file="):
            return self.model.esp_file(args[0].removeprefix("--file="), self.env), args[1:]
        default = f"{self.env.get('prefix', '')}/grubenv"
        return self.model.esp_file(default, self.env), args

    def cmd_load_env(self, args: list[str]) -> int:
        path, whitelist = self.file_option(args)
        block = _read_block(path)
        if block is None or path is None:
            return 1
        self.env_file = path
        for name, value in envblk_iterate(block):
            if not whitelist or name in whitelist:
                self.env[name] = value
        return 0

    def cmd_save_env(self, args: list[str]) -> int:
        path, names = self.file_option(args)
        if not names:
            return 1  # "no variable is specified"
        block = _read_block(path)
        if block is None or path is None:
            return 1
        for name in names:
            value = self.env.get(name)
            if value is None:
                envblk_delete(block, name)
            elif not envblk_set(block, name, value):
                return 1  # "environment block too small": nothing is written
        try:
            durable.rewrite_in_place(path, bytes(block))
        except OSError:
            return 1  # a disk write error fails the command; the script goes on
        return 0

    def cmd_linux(self, args: list[str]) -> int:
        if self.loaded is None:
            raise GrubModelError(f"{_WHO}: 'linux' outside a menu entry")
        if not args or not self.model.kernel_present(args[0]):
            return 1
        self.loaded.kernel, self.loaded.args = args[0], tuple(args[1:])
        return 0

    def cmd_initrd(self, args: list[str]) -> int:
        if self.loaded is None:
            raise GrubModelError(f"{_WHO}: 'initrd' outside a menu entry")
        if self.loaded.kernel is None:
            return 1  # GRUB: "you need to load the kernel first"
        return 0 if args and all(self.model.kernel_present(arg) for arg in args) else 1

    def add_entry(self, node: _Menuentry) -> None:
        argv = self.expand(node.words)
        if not argv:
            raise GrubModelError(f"{_WHO}: menuentry without a title")
        title, options, entry_id = argv[0], argv[1:], None
        while options:
            option = options.pop(0)
            if option == "--id" and options:
                entry_id = options.pop(0)
            elif option.startswith("--id="):
                entry_id = option.removeprefix("--id=")
            else:
                raise GrubModelError(f"{_WHO}: menuentry option {option!r} is not modelled")
        self.entries.append(_Entry(title, entry_id, node.body))

    def entry_at(self, index: int) -> _Entry | None:
        return self.entries[index] if index < len(self.entries) else None

    def default_entry(self) -> _Entry | None:
        """The entry ``default`` names (number, title or id); entry 0 if it names none."""
        wanted = self.env.get("default", "0")
        number = _entry_number(wanted)
        if number is not None:
            found = self.entry_at(number[0])
        else:
            found = next((e for e in self.entries if wanted in (e.entry_id, e.title)), None)
        return found or self.entry_at(0)

    def fallback_entries(self) -> list[_Entry | None]:
        """The entries ``fallback`` lists: numbers only, up to the first word that does not
        start with one (see the module docstring). None for a number past the last entry."""
        entries: list[_Entry | None] = []
        rest = self.env.get("fallback", "")
        while (number := _entry_number(rest)) is not None:
            entries.append(self.entry_at(number[0]))
            rest = number[1]
        return entries

    def boot_entry(self, entry: _Entry) -> str | None:
        """Run an entry's body; the kernel command line if it loaded a kernel, else None."""
        self.loaded = _Loaded()
        status = self.run(entry.body)
        loaded, self.loaded = self.loaded, None
        if status != 0 or loaded.kernel is None:
            return None
        return " ".join(("BOOT_IMAGE=" + loaded.kernel, *loaded.args))


def _entry_number(text: str) -> tuple[int, str] | None:
    """The number at the start of ``text`` as GRUB's ``strtoul`` reads it, and the text after
    it without leading blanks; None if ``text`` does not start with a number."""
    match = re.match(r"[ \t\n]*([0-9]+)[ \t\n]*", text)
    if match is None:
        return None
    digits = match.group(1)
    if digits.startswith("0") and (len(digits) > 1 or text[match.end(1) :].startswith("x")):
        raise GrubModelError(f"{_WHO}: entry number {text!r}: octal and hex are not modelled")
    return int(digits), text[match.end() :]


# ---------------------------------------------------------------------------------------------
# The environment block, as grub-core/lib/envblk.c handles it.

ENVBLK_SIGNATURE = b"# GRUB Environment Block\n"
_HASH, _NL, _BACKSLASH, _EQUALS = ord("#"), ord("\n"), ord("\\"), ord("=")
_TEXT = ("utf-8", "surrogateescape")


def envblk_open(data: bytes) -> bytearray | None:
    """The block as GRUB keeps it in memory, or None where ``grub_envblk_open`` refuses it
    ("invalid environment block"): shorter than ``sizeof`` the signature (its text and the C
    string's NUL), or not starting with the signature."""
    if len(data) < len(ENVBLK_SIGNATURE) + 1 or not data.startswith(ENVBLK_SIGNATURE):
        return None
    return bytearray(data)


def _next_line(buf: bytearray, position: int) -> int:
    """``find_next_line``: past the newline ending the line at ``position``; an escaped byte
    (even a newline) does not end it."""
    while position < len(buf):
        if buf[position] == _BACKSLASH:
            position += 2
        elif buf[position] == _NL:
            break
        else:
            position += 1
    return position + 1


def _c_string(raw: bytes | bytearray) -> str:
    return bytes(raw).split(b"\0", 1)[0].decode(*_TEXT)


def envblk_iterate(buf: bytearray) -> list[tuple[str, str]]:
    """``grub_envblk_iterate``: each ``name=value`` line in order, up to the first broken one
    (no ``=`` before the end, or a value running to the end); what came before is kept."""
    found: list[tuple[str, str]] = []
    position, end = len(ENVBLK_SIGNATURE), len(buf)
    while position < end:
        if buf[position] != _HASH:
            name_start = position
            while position < end and buf[position] != _EQUALS:
                position += 1
            if position == end:
                return found
            name_end = position
            position += 1
            value_start = position
            while position < end and buf[position] != _NL:
                position += 2 if buf[position] == _BACKSLASH else 1
            if position >= end:
                return found
            value = bytearray()
            cursor = value_start
            while buf[cursor] != _NL:
                if buf[cursor] == _BACKSLASH:
                    cursor += 1
                value.append(buf[cursor])
                cursor += 1
            found.append((_c_string(buf[name_start:name_end]), _c_string(value)))
        position = _next_line(buf, position)
    return found


def _escaped(value: bytes) -> bytes:
    out = bytearray()
    for byte in value:
        if byte in (_BACKSLASH, _NL):
            out.append(_BACKSLASH)
        out.append(byte)
    return bytes(out)


def _names_line(buf: bytearray, position: int, name: bytes) -> bool:
    return buf[position : position + len(name)] == name and buf[position + len(name)] == _EQUALS


def envblk_set(buf: bytearray, name: str, value: str) -> bool:
    """``grub_envblk_set`` on ``buf``, in place; False (``buf`` unchanged) where GRUB fails:
    the padding does not follow a newline, the line of ``name`` has no end, or no room."""
    raw_name = name.encode(*_TEXT).split(b"\0", 1)[0]
    raw_value = _escaped(value.encode(*_TEXT).split(b"\0", 1)[0])
    name_len, value_len, end = len(raw_name), len(raw_value), len(buf)
    space = end - 1
    while buf[space] == _HASH:
        space -= 1
    if buf[space] != _NL:
        return False
    space += 1
    position = len(ENVBLK_SIGNATURE)
    while position + name_len + 1 < space:
        if _names_line(buf, position, raw_name):
            position += name_len + 1
            old_len = 0
            while position + old_len < end and buf[position + old_len] != _NL:
                old_len += 2 if buf[position + old_len] == _BACKSLASH else 1
            if position + old_len >= end or end - space < value_len - old_len:
                return False
            if value_len < old_len:  # move the rest back, pad the freed room with '#'
                shrink = old_len - value_len
                buf[position + value_len : end - shrink] = buf[position + old_len : end]
                buf[space - shrink : space] = b"#" * shrink
            else:  # move the rest forward over the padding
                grow = value_len - old_len
                buf[position + value_len : end] = buf[position + old_len : end - grow]
            break
        position = _next_line(buf, position)
    else:
        if end - space < name_len + 1 + value_len + 1:
            return False
        buf[space : space + name_len + 1] = raw_name + b"="
        position = space + name_len + 1
    buf[position : position + value_len + 1] = raw_value + b"\n"
    return True


def envblk_delete(buf: bytearray, name: str) -> None:
    """``grub_envblk_delete`` on ``buf``, in place: the first line of ``name`` goes, the rest
    moves back, ``#`` fills the end. Nothing changes if there is none or its line has no end."""
    raw_name = name.encode(*_TEXT).split(b"\0", 1)[0]
    position, end = len(ENVBLK_SIGNATURE), len(buf)
    while position + len(raw_name) + 1 < end:
        if _names_line(buf, position, raw_name):
            length = len(raw_name) + 1
            while position + length < end and buf[position + length] != _NL:
                length += 2 if buf[position + length] == _BACKSLASH else 1
            if position + length >= end:
                return
            length += 1
            buf[position : end - length] = buf[position + length : end]
            buf[end - length : end] = b"#" * length
            return
        position = _next_line(buf, position)


def _read_block(path: Path | None) -> bytearray | None:
    """The block ``load_env``/``save_env`` would work on, None if GRUB cannot open it."""
    if path is None:
        return None
    try:
        return envblk_open(path.read_bytes())
    except OSError:
        return None


class GrubModel:
    """GRUB on the reference device: runs ``grub.cfg`` from the ESP, boots an entry.

    ``esp_dir`` is the ESP's content; GRUB finds it as device ``esp_device`` and reads
    ``config`` (relative to the ESP) as its configuration. ``kernel_present(file)`` tells
    whether a kernel or initrd named by a GRUB file name on another partition would load.
    """

    def __init__(
        self,
        esp_dir: Path,
        *,
        config: str = "EFI/fleet/grub.cfg",
        esp_device: str = "hd0,gpt1",
        kernel_present: Callable[[str], bool] | None = None,
    ) -> None:
        self.esp_dir = esp_dir
        self.config = config.strip("/")
        self.esp_device = esp_device
        self.kernel_present: Callable[[str], bool] = kernel_present or (lambda _file: True)

    def esp_file(self, grub_path: str, env: Mapping[str, str]) -> Path | None:
        """The file under ``esp_dir`` that a GRUB file name designates, or None if it is on
        another device."""
        device = env.get("root", "")
        path = grub_path
        if path.startswith("("):
            close = path.find(")")
            if close < 0:
                return None
            device, path = path[1:close], path[close + 1 :]
        if device != self.esp_device or not path.startswith("/"):
            return None
        relative = Path(path.lstrip("/"))
        if ".." in relative.parts:
            return None
        return self.esp_dir / relative

    def boot(self, event: BootEvent) -> BootOutcome:
        """Run GRUB once. ``event`` does not matter: GRUB's state is all on disk.

        Raises:
            GrubModelError: no entry boots (GRUB would stop at its menu), or the configuration
                is missing or outside the modelled subset.
        """
        del event  # power-on, reset and reboot are the same to GRUB
        machine = self._start()
        cmdline = self._boot_menu(machine)
        slot = _slot_of(cmdline)
        block = _read_block(machine.env_file)
        variables = dict(envblk_iterate(block)) if block is not None else {}
        trial_letter = variables.get("FLEET_TRIAL")
        trial = slot in ROOT_SLOTS and trial_letter == slot.upper()
        return BootOutcome(
            slot=slot, trial=trial, linux_view={"proc/cmdline": (cmdline + "\n").encode()}
        )

    def _start(self) -> _Machine:
        config_file = self.esp_dir / self.config
        try:
            text = config_file.read_text()
        except OSError as err:
            raise GrubModelError(
                f"{_WHO}: cannot read {config_file} ({err.strerror}): GRUB stops at its prompt"
            ) from err
        directory = "/" + self.config.rpartition("/")[0]
        env = {
            "root": self.esp_device,
            "prefix": f"({self.esp_device}){directory}",
            "config_directory": f"({self.esp_device}){directory}",
            "config_file": f"({self.esp_device})/{self.config}",
        }
        machine = _Machine(self, env)
        machine.run(parse_script(text))
        return machine

    def _boot_menu(self, machine: _Machine) -> str:
        # timeout=0 in our script: the default entry boots at once, then each fallback.
        tried: list[str] = []
        for entry in [machine.default_entry(), *machine.fallback_entries()]:
            if entry is None:
                continue
            tried.append(repr(entry.title))
            cmdline = machine.boot_entry(entry)
            if cmdline is not None:
                return cmdline
        raise GrubModelError(
            f"{_WHO}: no menu entry booted (tried {', '.join(tried) or 'none'}): GRUB stops at "
            "its menu"
        )


def _slot_of(cmdline: str) -> str:
    for word in cmdline.split():
        if word.startswith("fleet.slot="):
            slot = word.removeprefix("fleet.slot=")
            if slot in ALL_SLOTS:
                return slot
    raise GrubModelError(f"{_WHO}: the booted entry names no slot: {cmdline!r}")
