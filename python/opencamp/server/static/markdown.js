// A small, safe Markdown renderer for streamed model replies (no dependencies).
// Safety: all text is HTML-escaped first; only the markup built here reaches the page, and links
// are kept only for http(s) URLs. It renders partial input well: an unclosed ``` fence shows as a
// code block that grows while the reply streams.
"use strict";

(function (global) {
  function escapeHtml(text) {
    return text.replace(/&/g, "&amp;").replace(/</g, "&lt;").replace(/>/g, "&gt;")
      .replace(/"/g, "&quot;").replace(/'/g, "&#39;");
  }

  // Inline markup on already-escaped text: code spans first (their content stays literal).
  function inline(escaped) {
    const codes = [];
    let out = escaped.replace(/`([^`\n]+)`/g, (_, code) => {
      codes.push(code);
      return "\u0000" + (codes.length - 1) + "\u0000";
    });
    out = out.replace(/\[([^\]\n]+)\]\((https?:\/\/[^\s)]+)\)/g,
      (_, label, url) => `<a href="${url}" target="_blank" rel="noopener noreferrer">${label}</a>`);
    out = out.replace(/\*\*([^*\n]+)\*\*/g, "<strong>$1</strong>");
    out = out.replace(/__([^_\n]+)__/g, "<strong>$1</strong>");
    out = out.replace(/(^|[^*\w])\*([^*\n]+)\*(?!\w)/g, "$1<em>$2</em>");
    out = out.replace(/(^|[^_\w])_([^_\n]+)_(?!\w)/g, "$1<em>$2</em>");
    out = out.replace(/~~([^~\n]+)~~/g, "<del>$1</del>");
    return out.replace(/\u0000(\d+)\u0000/g, (_, i) => `<code>${codes[Number(i)]}</code>`);
  }

  function render(source) {
    const lines = source.replace(/\r\n?/g, "\n").split("\n");
    const html = [];
    let i = 0;
    let paragraph = [];
    const flush = () => {
      if (paragraph.length) {
        html.push("<p>" + paragraph.map((l) => inline(escapeHtml(l))).join("<br>") + "</p>");
        paragraph = [];
      }
    };
    while (i < lines.length) {
      const line = lines[i];
      const fence = line.match(/^\s*(```+|~~~+)\s*([\w+#.-]*)\s*$/);
      if (fence) {
        flush();
        const close = fence[1];
        const body = [];
        i += 1;
        while (i < lines.length && !lines[i].trim().startsWith(close)) body.push(lines[i++]);
        i += 1; // the closing fence (or the end of a reply still streaming)
        const lang = fence[2] ? ` data-lang="${escapeHtml(fence[2])}"` : "";
        html.push(`<pre${lang}><code>${escapeHtml(body.join("\n"))}</code></pre>`);
        continue;
      }
      const heading = line.match(/^(#{1,6})\s+(.*)$/);
      if (heading) {
        flush();
        const level = heading[1].length;
        html.push(`<h${level}>${inline(escapeHtml(heading[2]))}</h${level}>`);
        i += 1;
        continue;
      }
      const list = line.match(/^\s*([-*+]|\d+[.)])\s+/);
      if (list) {
        flush();
        const ordered = /\d/.test(list[1]);
        const itemOf = (text) => {
          const m = text.match(/^\s*([-*+]|\d+[.)])\s+(.*)$/);
          return m && /\d/.test(m[1]) === ordered ? m : null;
        };
        const items = [];
        while (i < lines.length) {
          const m = itemOf(lines[i]);
          if (m) {
            items.push(inline(escapeHtml(m[2])));
            i += 1;
          } else if (lines[i].trim() === "") {
            // A "loose" list: blank lines between items keep it one list.
            let next = i;
            while (next < lines.length && lines[next].trim() === "") next += 1;
            if (next >= lines.length || !itemOf(lines[next])) break;
            i = next;
          } else if (/^\s{2,}\S/.test(lines[i]) && items.length) {
            items[items.length - 1] += "<br>" + inline(escapeHtml(lines[i].trim()));
            i += 1;
          } else {
            break;
          }
        }
        const start = ordered ? parseInt(list[1], 10) : 1;
        const tag = ordered ? "ol" : "ul";
        const attrs = start !== 1 ? ` start="${start}"` : "";
        html.push(`<${tag}${attrs}>${items.map((item) => `<li>${item}</li>`).join("")}</${tag}>`);
        continue;
      }
      if (/^\s*>/.test(line)) {
        flush();
        const quoted = [];
        while (i < lines.length && /^\s*>/.test(lines[i])) quoted.push(lines[i++].replace(/^\s*>\s?/, ""));
        html.push(`<blockquote>${render(quoted.join("\n"))}</blockquote>`);
        continue;
      }
      if (/^\s*([-*_])(\s*\1){2,}\s*$/.test(line)) {
        flush();
        html.push("<hr>");
        i += 1;
        continue;
      }
      if (line.trim() === "") {
        flush();
      } else {
        paragraph.push(line);
      }
      i += 1;
    }
    flush();
    return html.join("\n");
  }

  global.renderMarkdown = render;
  global.escapeHtml = escapeHtml;
})(window);
