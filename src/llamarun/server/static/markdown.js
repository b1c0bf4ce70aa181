// Markdown for the answers, written for this page: paragraphs, headings, lists, quotes, rules,
// tables, bold/italic/strikethrough, links, inline code and fenced code blocks.
//
// A model's output is untrusted, so the whole text is HTML-escaped before any markdown is read:
// every tag in the result is one this file writes, and text can never become markup. Links keep
// only http(s) and mailto addresses, so "javascript:" and the like stay plain text.

const ESCAPES = { "&": "&amp;", "<": "&lt;", ">": "&gt;", '"': "&quot;", "'": "&#39;" };
const UNESCAPES = Object.fromEntries(Object.entries(ESCAPES).map(([k, v]) => [v, k]));

export function escapeHtml(text) {
  return text.replace(/[&<>"']/g, (c) => ESCAPES[c]);
}

function unescapeHtml(html) {
  return html.replace(/&(?:amp|lt|gt|quot|#39);/g, (e) => UNESCAPES[e]);
}

export function renderMarkdown(text) {
  // NUL marks this file's placeholders (see inline), so it must not come from the text.
  const lines = escapeHtml(text.replace(/\0/g, "")).split(/\r?\n/);
  return blocks(lines).join("\n");
}

const FENCE = /^( {0,3})(`{3,}|~{3,})\s*([\w+#.-]*)[^`]*$/;
const HEADING = /^ {0,3}(#{1,6})\s+(.*?)(?:\s+#+)?\s*$/;
const RULE = /^ {0,3}([-*_])(?:\s*\1){2,}\s*$/;
const QUOTE = /^ {0,3}&gt; ?/;
const ITEM = /^( *)([-*+]|\d{1,9}[.)])\s+(.*)$/;
const TABLE_RULE = /^\s*\|?\s*:?-{3,}:?\s*(\|\s*:?-{3,}:?\s*)*\|?\s*$/;

const indentOf = (line) => line.match(/^ */)[0].length;

function startsBlock(line, next) {
  return (
    FENCE.test(line) ||
    HEADING.test(line) ||
    RULE.test(line) ||
    QUOTE.test(line) ||
    ITEM.test(line) ||
    (line.includes("|") && next !== undefined && TABLE_RULE.test(next))
  );
}

function blocks(lines) {
  const out = [];
  let i = 0;
  while (i < lines.length) {
    const line = lines[i];
    let m;
    if (!line.trim()) {
      i++;
    } else if ((m = FENCE.exec(line))) {
      i = codeBlock(lines, i, m, out);
    } else if ((m = HEADING.exec(line))) {
      const level = m[1].length;
      out.push(`<h${level}>${inline(m[2])}</h${level}>`);
      i++;
    } else if (RULE.test(line)) {
      out.push("<hr>");
      i++;
    } else if (QUOTE.test(line)) {
      const inner = [];
      while (i < lines.length && QUOTE.test(lines[i])) inner.push(lines[i++].replace(QUOTE, ""));
      out.push(`<blockquote>${blocks(inner).join("\n")}</blockquote>`);
    } else if (ITEM.test(line)) {
      i = list(lines, i, out);
    } else if (line.includes("|") && TABLE_RULE.test(lines[i + 1] ?? "")) {
      i = table(lines, i, out);
    } else {
      const para = [line];
      i++;
      while (i < lines.length && lines[i].trim() && !startsBlock(lines[i], lines[i + 1])) {
        para.push(lines[i++]);
      }
      out.push(`<p>${para.map((l) => inline(l.trim())).join("<br>\n")}</p>`);
    }
  }
  return out;
}

// An unclosed fence runs to the end of the text: that is what a code block looks like while
// its answer is still streaming in.
function codeBlock(lines, i, open, out) {
  const [, indent, fence, lang] = open;
  const close = new RegExp(`^ {0,3}${fence[0] === "`" ? "`" : "~"}{${fence.length},}\\s*$`);
  const code = [];
  for (i++; i < lines.length && !close.test(lines[i]); i++) {
    code.push(lines[i].slice(Math.min(indent.length, indentOf(lines[i]))));
  }
  const cls = lang ? ` class="language-${lang}"` : "";
  out.push(
    `<div class="code-block"><div class="code-head"><span class="code-lang">${lang || "code"}</span>` +
      `<button type="button" class="copy" aria-label="Copy code">Copy</button></div>` +
      `<pre><code${cls}>${code.join("\n")}</code></pre></div>`,
  );
  return i + 1;
}

function list(lines, i, out) {
  const first = ITEM.exec(lines[i]);
  const indent = first[1].length;
  const ordered = /\d/.test(first[2]);
  const sameKind = (m) => m && indentOf(m[0]) === indent && /\d/.test(m[2]) === ordered;
  const items = [];
  let loose = false;
  while (i < lines.length) {
    const line = lines[i];
    const m = ITEM.exec(line);
    if (sameKind(m)) {
      items.push([m[3]]);
      i++;
    } else if (!line.trim()) {
      // a blank line ends the list unless the list (or this item) goes on after it
      let j = i + 1;
      while (j < lines.length && !lines[j].trim()) j++;
      if (j === lines.length || !(indentOf(lines[j]) > indent || sameKind(ITEM.exec(lines[j])))) {
        break;
      }
      loose = true;
      items.at(-1).push("");
      i = j;
    } else if (indentOf(line) > indent) {
      items.at(-1).push(line); // nested content or a continued line of this item
      i++;
    } else if (!m && lines[i - 1].trim() && !startsBlock(line, lines[i + 1])) {
      items.at(-1).push(line); // a "lazy" continuation line
      i++;
    } else {
      break;
    }
  }
  const start = ordered ? parseInt(first[2], 10) : 1;
  const tag = ordered ? "ol" : "ul";
  const open = ordered && start !== 1 ? `<ol start="${start}">` : `<${tag}>`;
  out.push(`${open}${items.map((item) => `<li>${listItem(item, loose)}</li>`).join("")}</${tag}>`);
  return i;
}

function listItem([head, ...rest], loose) {
  const shift = Math.min(...rest.filter((l) => l.trim()).map(indentOf));
  const body = blocks([head, ...rest.map((l) => l.slice(Math.min(shift, indentOf(l))))]);
  // a tight list item's text is not a paragraph of its own
  if (!loose && body[0]?.startsWith("<p>")) body[0] = body[0].slice(3, -4);
  return body.join("\n");
}

function table(lines, i, out) {
  const cells = (line) =>
    line
      .trim()
      .replace(/^\|/, "")
      .replace(/\|$/, "")
      .split("|")
      .map((c) => inline(c.trim()));
  const aligns = cells(lines[i + 1]).map((c) =>
    c.endsWith(":") ? (c.startsWith(":") ? "center" : "right") : c.startsWith(":") ? "left" : "",
  );
  const row = (line, tag) =>
    `<tr>${cells(line)
      .map((c, k) => `<${tag}${aligns[k] ? ` class="align-${aligns[k]}"` : ""}>${c}</${tag}>`)
      .join("")}</tr>`;
  const body = [];
  let j = i + 2;
  while (j < lines.length && lines[j].includes("|") && lines[j].trim()) body.push(row(lines[j++], "td"));
  out.push(
    `<div class="table-wrap"><table><thead>${row(lines[i], "th")}</thead>` +
      `<tbody>${body.join("")}</tbody></table></div>`,
  );
  return j;
}

// Inline markup. Finished pieces (code spans, links) are set aside behind NUL-numbered
// placeholders, so later rules cannot reach into them.
function inline(text) {
  const kept = [];
  const keep = (html) => `\0${kept.push(html) - 1}\0`;
  let s = text.replace(/(`+)([^`]|[^`][\s\S]*?[^`])\1(?!`)/g, (_, __, code) =>
    keep(`<code>${code}</code>`),
  );
  s = s.replace(/\\([\\`*_{}[\]()#+\-.!~|])/g, (_, c) => keep(c));
  s = s.replace(/\[([^\]\n]+)\]\(\s*([^\s()]+(?:\([^\s()]*\)[^\s()]*)*)\s*\)/g, (_, label, url) => {
    const href = safeHref(url);
    return href ? keep(link(href, emphasis(label))) : label;
  });
  s = s.replace(/\bhttps?:\/\/(?:(?!&(?:quot|lt|gt|#39);)[^\s\0])+/g, (url) => {
    const tail = url.match(/[.,:;!?)\]*_]*$/)[0]; // sentence punctuation after an address
    const bare = url.slice(0, url.length - tail.length);
    return keep(link(bare, bare)) + tail;
  });
  s = emphasis(s);
  while (/\0\d+\0/.test(s)) s = s.replace(/\0(\d+)\0/g, (_, n) => kept[n]);
  return s;
}

function emphasis(s) {
  // Emphasis never spans a tag ("<" only ever comes from this file), so the markup stays nested.
  return s
    .replace(/\*\*\*(?=\S)([^<]*?\S)\*\*\*/g, "<strong><em>$1</em></strong>")
    .replace(/\*\*(?=\S)([^<]*?\S)\*\*/g, "<strong>$1</strong>")
    .replace(/(^|[^\w])__(?=\S)([^<]*?\S)__(?!\w)/g, "$1<strong>$2</strong>")
    .replace(/\*(?=[^\s*])([^<*]*?[^\s*])\*/g, "<em>$1</em>")
    .replace(/(^|[^\w])_(?=[^\s_])([^<_]*?[^\s_])_(?!\w)/g, "$1<em>$2</em>")
    .replace(/~~(?=\S)([^<]*?\S)~~/g, "<del>$1</del>");
}

// `url` is already escaped, so it cannot close the attribute; the check reads it unescaped.
function safeHref(url) {
  return /^(https?:\/\/|mailto:)/i.test(unescapeHtml(url)) ? url : null;
}

function link(href, label) {
  return `<a href="${href}" target="_blank" rel="noopener noreferrer nofollow">${label}</a>`;
}
