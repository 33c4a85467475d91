#!/usr/bin/env python3
"""The import graph between a crate's modules, and the cycles in it.

    scripts/module-cycles.py [--graph] CRATE_SRC_DIR...
    scripts/module-cycles.py --self-test

For each library crate (its `src/` directory, entered at `lib.rs`), every
`crate::...` and `super::...` path in the sources (test modules left out, as
`cargo modules` leaves them out by default) becomes an edge between modules at
two levels:

- between the crate's top-level modules (`crate::store` and everything under
  it is one node), and
- between sibling submodules of one top-level module (`store::kube_store` and
  `store::kube_nodes`), a parent and its own children excepted: a parent
  declares its children and a child may use its parent's types.

It prints every cycle and exits 1 if there is one (the lint tier runs it), or
prints the graph with --graph. Paths the compiler resolves through `pub use`
re-exports count where they are written, which is what a reader follows.
"""

import os
import re
import sys

CFG_TEST = re.compile(r"#\[cfg\(test\)\]")
PATH = re.compile(r"\b(crate|super)((?:::(?:super\b|self\b|\w+|\{))+)")
ITEM = re.compile(
    r"\s*(?:#\[[^\]]*\]\s*)*(?:pub(?:\([^)]*\))?\s+)?"
    r"(?:mod|fn|async|unsafe|use|impl|struct|enum|const|static|type|trait|extern|macro_rules!)\b"
)


def strip(text):
    """Comments and literals out, in one left-to-right pass (so a "/*" in a
    string or a quote in a comment is taken for what it is); each string
    or char literal is kept as "" so no path is found in one. Block comments
    nest, as in Rust; a lifetime is not a char literal."""
    out, i, n = [], 0, len(text)
    while i < n:
        c = text[i]
        if text.startswith("//", i):
            j = text.find("\n", i)
            i = n if j < 0 else j
        elif text.startswith("/*", i):
            depth, i = 1, i + 2
            while i < n and depth:
                if text.startswith("/*", i):
                    depth, i = depth + 1, i + 2
                elif text.startswith("*/", i):
                    depth, i = depth - 1, i + 2
                else:
                    i += 1
            out.append(" ")
        elif (m := re.match(r'(?:b|c)?r(#*)"', text[i:])) and (i == 0 or not (text[i - 1].isalnum() or text[i - 1] == "_")):
            end = text.find('"' + m.group(1), i + m.end())
            i = n if end < 0 else end + 1 + len(m.group(1))
            out.append('""')
        elif c == '"' or (c in "bc" and text.startswith('"', i + 1) and (i == 0 or not (text[i - 1].isalnum() or text[i - 1] == "_"))):
            i += 1 if c == '"' else 2
            while i < n and text[i] != '"':
                i += 2 if text[i] == "\\" else 1
            i += 1
            out.append('""')
        elif c == "'" and (m := re.match(r"'(?:\\u\{[0-9a-fA-F]+\}|\\x[0-9a-fA-F]{2}|\\.|[^\\'\n])'", text[i:])):
            i += m.end()
            out.append('""')
        else:
            out.append(c)
            i += 1
    return "".join(out)


def skip_item(text, pos):
    """The end of the item starting at pos: its `;` or its balanced block.
    Stops at the `}` that closes what encloses it (never reads past it)."""
    depth = 0
    while pos < len(text):
        ch = text[pos]
        if ch == ";" and depth == 0:
            return pos + 1
        if ch == "{":
            depth += 1
        elif ch == "}":
            depth -= 1
            if depth == 0:
                return pos + 1
            if depth < 0:
                return pos
        pos += 1
    return pos


def drop_tests(text):
    """Items under #[cfg(test)] out. The attribute on anything but an item
    (a field, a statement) drops nothing: such code is not a module's use."""
    out, pos = [], 0
    for m in CFG_TEST.finditer(text):
        if m.start() < pos:
            continue
        out.append(text[pos : m.start()])
        pos = skip_item(text, m.end()) if ITEM.match(text, m.end()) else m.end()
    out.append(text[pos:])
    return "".join(out)


def group_heads(text, start):
    """The first segments of the paths in a `{...}` group opening at start."""
    heads, depth, item, pos = [], 0, "", start
    while pos < len(text):
        ch = text[pos]
        if ch == "{":
            depth += 1
            if depth == 1:
                pos += 1
                continue
        elif ch == "}":
            depth -= 1
            if depth == 0:
                heads.append(item)
                break
        if depth == 1 and ch == ",":
            heads.append(item)
            item = ""
        elif depth >= 1:
            item += ch
        pos += 1
    return [re.split(r"::|\s|\{", h.strip())[0] for h in heads if h.strip()]


def module_of(src, path):
    rel = os.path.relpath(path, src)[: -len(".rs")].split(os.sep)
    if rel[-1] in ("mod", "lib"):
        rel = rel[:-1]
    return rel


def references(mod, text):
    """Module paths (lists of segments) that text, in module mod, names."""
    for m in PATH.finditer(text):
        base = [] if m.group(1) == "crate" else mod[:-1]
        segs = [s for s in m.group(2).split("::") if s]
        path = list(base)
        ok = True
        for i, s in enumerate(segs):
            if s == "super":
                if not path:
                    ok = False
                    break
                path = path[:-1]
            elif s == "self":
                continue
            elif s == "{":
                for head in group_heads(text, m.end() - 1):
                    if head not in ("self", "super", "*", ""):
                        yield path + [head]
                    else:
                        yield path
                ok = False
                break
            else:
                path.append(s)
        if ok and path:
            yield path


def crate_graph(src):
    if not os.path.isfile(os.path.join(src, "lib.rs")):
        raise SystemExit(f"module-cycles.py: {src} has no lib.rs: not a library crate's sources (a renamed crate?)")
    files = []
    for root, _, names in os.walk(src):
        files += [os.path.join(root, n) for n in names if n.endswith(".rs")]
    mods = {}
    for f in files:
        if os.path.basename(f) == "main.rs" and os.path.dirname(f) == src:
            continue  # the binary: a crate of its own that uses the library
        if os.path.basename(f) in ("tests.rs",):
            continue
        mods[tuple(module_of(src, f))] = drop_tests(strip(open(f).read()))
    known = set(mods)

    def owner(path):
        """The longest known module that is a prefix of path (None for an
        item at the crate root, or a path from an inline module's `super::`
        that left its file: both stay within a module already counted)."""
        for n in range(len(path), 0, -1):
            if tuple(path[:n]) in known:
                return path[:n]
        return None

    top, sub = {}, {}
    for mod, text in mods.items():
        if not mod:
            continue
        for ref in references(list(mod), text):
            target = owner(ref)
            if target is None:
                continue
            if target[0] != mod[0]:
                top.setdefault(mod[0], set()).add(target[0])
            # Siblings under one parent: compare at the depth where they part.
            depth = 0
            while depth < min(len(mod), len(target)) and mod[depth] == target[depth]:
                depth += 1
            if 0 < depth < len(mod) and depth < len(target):
                a = "::".join(mod[: depth + 1])
                b = "::".join(target[: depth + 1])
                sub.setdefault(a, set()).add(b)
    return top, sub


def cycles(graph):
    """Strongly connected components of more than one node (Tarjan)."""
    index, low, stack, on, out, counter = {}, {}, [], set(), [], [0]

    def visit(v):
        index[v] = low[v] = counter[0]
        counter[0] += 1
        stack.append(v)
        on.add(v)
        for w in sorted(graph.get(v, ())):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            comp = []
            while True:
                w = stack.pop()
                on.discard(w)
                comp.append(w)
                if w == v:
                    break
            if len(comp) > 1:
                out.append(sorted(comp))

    for v in sorted(set(graph) | {w for ws in graph.values() for w in ws}):
        if v not in index:
            visit(v)
    return out


def self_test():
    """The check finds a cycle, and none where only tests, comments or
    strings name the other module (the lint tier runs this first)."""
    import tempfile

    files = {
        "lib.rs": "mod a;\nmod b;\nmod c;\n",
        "a.rs": (
            "pub struct A;\n/* a /* nested */ \"c */\n"
            'const S: &str = "/* not a comment";\n'
            'const R: &str = r#"crate::c::C "# quote"#;\n'
            "fn f<'a>(x: &'a str) -> char { '\"' }\n"
            "use crate::b::B;\n"
        ),
        "b.rs": "pub struct B {\n    #[cfg(test)]\n    t: u8,\n    x: u8,\n}\nuse crate::{a::A, c};\n",
        "c.rs": (
            "pub struct C;\n// use crate::a::A;\nconst T: &str = \"crate::a::A\";\n"
            "#[cfg(test)]\nmod tests {\n    use crate::b::B;\n}\n"
        ),
    }
    with tempfile.TemporaryDirectory() as d:
        for name, text in files.items():
            with open(os.path.join(d, name), "w") as f:
                f.write(text)
        top, _ = crate_graph(d)
        assert top == {"a": {"b"}, "b": {"a", "c"}}, top
        assert cycles(top) == [["a", "b"]], cycles(top)
        del files["a.rs"]
        os.remove(os.path.join(d, "a.rs"))
        with open(os.path.join(d, "lib.rs"), "w") as f:
            f.write("mod b;\nmod c;\n")
        top, _ = crate_graph(d)
        assert cycles(top) == [], top
        try:
            crate_graph(os.path.join(d, "missing"))
            raise AssertionError("a directory with no lib.rs must fail the check")
        except SystemExit:
            pass
    print("module-cycles.py: self-test passed")
    return 0


def main(argv):
    if argv == ["--self-test"]:
        return self_test()
    show = "--graph" in argv
    srcs = [a for a in argv if a != "--graph"]
    found = 0
    for src in srcs:
        crate = os.path.basename(os.path.dirname(os.path.abspath(src)))
        top, sub = crate_graph(src)
        for level, graph in (("modules", top), ("submodules", sub)):
            if show:
                print(f"{crate} {level}:")
                for a in sorted(graph):
                    print(f"  {a} -> {', '.join(sorted(graph[a]))}")
            for comp in cycles(graph):
                found += 1
                edges = [f"{a} -> {b}" for a in comp for b in sorted(graph[a]) if b in comp]
                print(f"{crate}: a cycle between {level} {', '.join(comp)}: {'; '.join(edges)}")
    if found:
        print(f"{found} module cycle(s): give the shared part a leaf module both can use")
        return 1
    if not show:
        print(f"no module cycles in {', '.join(srcs)}")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
