// A small Markdown renderer for model answers. Safety rests on one rule: every piece of the model's text
// is HTML-escaped before anything else, and the only markup in the result is the tags written here.

const ESCAPES = { "&": "&amp;", "<": "&lt;", ">": "&gt;", '"': "&quot;", "'": "&#39;" };

export function escapeHtml(text) {
  return text.replace(/[&<>"']/g, (c) => ESCAPES[c]);
}

const SAFE_URL = /^(https?:\/\/|mailto:)/i;
// placeholders for inline code while the other inline rules run: \u0000 never survives into them
const HOLD = /\u0000(\d+)\u0000/g;

function inline(text) {
  const held = [];
  const hold = (html) => `\u0000${held.push(html) - 1}\u0000`;
  let s = escapeHtml(text);
  s = s.replace(/(`+)([^`]|[^`][\s\S]*?[^`])\1(?!`)/g, (_, __, code) => hold(`<code>${code}</code>`));
  s = s.replace(/\[([^\]\n]+)\]\(([^)\s]+)\)/g, (whole, label, url) => {
    // the URL was escaped with the rest; its scheme decides whether it becomes a link
    if (!SAFE_URL.test(url)) return whole;
    return hold(`<a href="${url}" target="_blank" rel="noopener noreferrer">${label}</a>`);
  });
  s = s.replace(/(\*\*|__)(?=\S)([\s\S]*?\S)\1/g, "<strong>$2</strong>");
  s = s.replace(/(^|[^\w*])\*(?=\S)([^*\n]*?\S)\*(?!\*)/g, "$1<em>$2</em>");
  s = s.replace(/(^|[^\w_])_(?=\S)([^_\n]*?\S)_(?![\w_])/g, "$1<em>$2</em>");
  s = s.replace(/~~(?=\S)([\s\S]*?\S)~~/g, "<del>$1</del>");
  // held pieces may hold others (a link label with code in it): restore until none is left
  while (s.includes("\u0000")) s = s.replace(HOLD, (_, i) => held[Number(i)]);
  return s;
}

const FENCE = /^\s{0,3}(`{3,}|~{3,})\s*([\w+#.-]*)/;
const HEADING = /^\s{0,3}(#{1,6})\s+(.*?)\s*#*\s*$/;
const BULLET = /^(\s*)[-*+]\s+(.*)$/;
const NUMBERED = /^(\s*)(\d{1,9})[.)]\s+(.*)$/;
const QUOTE = /^\s{0,3}>\s?(.*)$/;
const RULE = /^\s{0,3}([-*_])(\s*\1){2,}\s*$/;

// One list (bulleted or numbered) from consecutive item lines; deeper indentation opens a nested list.
function list(items) {
  let html = "";
  const open = [];  // [indent, tag] of the lists not yet closed
  for (const item of items) {
    while (open.length && item.indent < open[open.length - 1][0]) html += `</li></${open.pop()[1]}>`;
    // a numbered item after bullets at the same depth (or the reverse) starts a list of its own
    if (open.length && item.indent === open[open.length - 1][0] && item.tag !== open[open.length - 1][1]) {
      html += `</li></${open.pop()[1]}>`;
    }
    const top = open[open.length - 1];
    if (!top || item.indent > top[0]) {
      const start = item.tag === "ol" && item.start !== 1 ? ` start="${item.start}"` : "";
      html += `<${item.tag}${start}><li>`;
      open.push([item.indent, item.tag]);
    } else {
      html += "</li><li>";
    }
    html += inline(item.text);
  }
  while (open.length) html += `</li></${open.pop()[1]}>`;
  return html;
}

export function renderMarkdown(source) {
  const lines = source.replace(/\u0000/g, "").replace(/\r\n?/g, "\n").split("\n");
  const out = [];
  let para = [], items = [], quote = [];
  const flush = () => {
    if (para.length) out.push(`<p>${para.map(inline).join("<br>")}</p>`);
    if (items.length) out.push(list(items));
    if (quote.length) out.push(`<blockquote>${renderMarkdown(quote.join("\n"))}</blockquote>`);
    para = []; items = []; quote = [];
  };
  for (let i = 0; i < lines.length; i++) {
    const line = lines[i];
    const fence = line.match(FENCE);
    if (fence) {
      flush();
      const code = [];
      // an unclosed fence (an answer still streaming) runs to the end
      for (i++; i < lines.length && !lines[i].trimStart().startsWith(fence[1]); i++) code.push(lines[i]);
      if (i >= lines.length && code.at(-1) === "") code.pop();  // the newline just streamed, not a line yet
      const lang = fence[2] ? ` class="language-${escapeHtml(fence[2])}"` : "";
      out.push(`<pre><code${lang}>${escapeHtml(code.join("\n"))}</code></pre>`);
      continue;
    }
    let m;
    if (!line.trim()) { flush(); continue; }
    if ((m = line.match(QUOTE))) { if (!quote.length) flush(); quote.push(m[1]); continue; }
    if ((m = line.match(BULLET)) && !RULE.test(line)) {
      if (!items.length) flush();
      items.push({ indent: m[1].length, tag: "ul", text: m[2] });
      continue;
    }
    if ((m = line.match(NUMBERED))) {
      if (!items.length) flush();
      items.push({ indent: m[1].length, tag: "ol", start: Number(m[2]), text: m[3] });
      continue;
    }
    if (items.length && /^\s+\S/.test(line)) { items[items.length - 1].text += " " + line.trim(); continue; }
    if ((m = line.match(HEADING))) { flush(); out.push(`<h${m[1].length}>${inline(m[2])}</h${m[1].length}>`); continue; }
    if (RULE.test(line)) { flush(); out.push("<hr>"); continue; }
    if (items.length || quote.length) flush();
    para.push(line);
  }
  flush();
  return out.join("\n");
}
