/* harness site: sortable table columns. Loaded from the site's own folder (CSP script-src 'self').
   Progressive enhancement: without this script every table is complete and readable; with it, each
   header of a table with class "sortable" gets a sort button. Rows are only re-ordered (no markup is
   built from text), so nothing read from a result file can become code. */
(function () {
  "use strict";

  function sortKey(cell, numeric) {
    if (!cell) return null;
    var raw = cell.getAttribute("data-value");
    if (raw === null) raw = cell.textContent.trim();
    if (!numeric) return raw.toLowerCase();
    if (raw === "") return null;
    var x = Number(raw);
    return isFinite(x) ? x : null;
  }

  function sortTable(table, index) {
    var headers = table.tHead.rows[0].cells;
    var th = headers[index];
    var numeric = th.getAttribute("data-sort") === "number";
    var state = th.getAttribute("aria-sort");
    var descending;
    if (state === "descending") descending = false;
    else if (state === "ascending") descending = true;
    else descending = numeric && th.getAttribute("data-better") !== "lower";  // best first
    var body = table.tBodies[0];
    var rows = Array.prototype.slice.call(body.rows);
    var order = new Map();
    rows.forEach(function (row, i) { order.set(row, i); });
    rows.sort(function (a, b) {
      var x = sortKey(a.cells[index], numeric), y = sortKey(b.cells[index], numeric);
      if (x === null || y === null) {
        if (x === y) return order.get(a) - order.get(b);
        return x === null ? 1 : -1;  // empty cells last, either direction
      }
      if (x < y) return descending ? 1 : -1;
      if (x > y) return descending ? -1 : 1;
      return order.get(a) - order.get(b);
    });
    rows.forEach(function (row) { body.appendChild(row); });
    for (var i = 0; i < headers.length; i++) {
      headers[i].removeAttribute("aria-sort");
      var button = headers[i].querySelector("button.sort");
      if (button) button.textContent = "\u21C5";
    }
    th.setAttribute("aria-sort", descending ? "descending" : "ascending");
    th.querySelector("button.sort").textContent = descending ? "\u25BC" : "\u25B2";
  }

  function enhance(table) {
    if (!table.tHead || !table.tBodies.length) return;
    var headers = table.tHead.rows[0].cells;
    Array.prototype.forEach.call(headers, function (th, index) {
      var button = document.createElement("button");
      button.type = "button";
      button.className = "sort";
      button.textContent = "\u21C5";
      button.title = "Sort by this column";
      button.setAttribute("aria-label", "Sort by this column");
      button.addEventListener("click", function () { sortTable(table, index); });
      var after = th.querySelector(".dir") || th.querySelector(".colname");
      if (after) after.insertAdjacentElement("afterend", button);
      else th.appendChild(button);
    });
    table.classList.add("sort-ready");
  }

  function start() {
    Array.prototype.forEach.call(document.querySelectorAll("table.sortable"), enhance);
  }

  if (document.readyState === "loading") document.addEventListener("DOMContentLoaded", start);
  else start();
})();
