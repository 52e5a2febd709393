// The Ledger console: plain JS, no library, no build step. Reads /api/info, /api/policies,
// /api/subscribers and the server-sent events of /api/feed; draws the network map on a canvas.
'use strict';

(() => {
  const TYPES = ['master', 'operator', 'publisher', 'query', 'cluster', 'table', 'subscriber'];
  const COLORS = {
    master: '#7b1fa2', operator: '#1565c0', publisher: '#2e7d32', query: '#ef6c00',
    cluster: '#c62828', table: '#6d7a8c', subscriber: '#00838f',
  };
  const RADIUS = { master: 9, cluster: 8, operator: 6, publisher: 6, query: 6, table: 4, subscriber: 6 };
  const $ = (id) => document.getElementById(id);

  // ---- the model: every policy by id; the map's nodes and edges are derived from it ----
  const policies = new Map(); // id -> {id, type, body, seq}
  let headSeq = 0;
  let nodes = []; // {key, type, label, x, y, policyId, search, extra}
  let nodeByKey = new Map();
  let edges = []; // [fromNode, toNode]
  let matches = [];
  let matchIndex = 0;
  let selected = null;
  // The streams of this master and of the relays below it (/api/subscribers), and the shape of
  // their tree when the map was last built (the map is rebuilt only when the tree changes).
  let subscribers = [];
  let subscriberTree = '';

  function addPolicy(policy, seq) {
    const type = Object.keys(policy)[0];
    const body = policy[type];
    if (!body || typeof body !== 'object') return;
    const id = body.id || ('seq-' + seq);
    policies.set(id, { id, type, body, seq, policy });
  }

  function str(v) { return v === undefined || v === null ? '' : String(v); }

  function nodeFor(p) {
    const b = p.body;
    const label = str(b.name) || p.id;
    return {
      key: p.id, type: p.type, label, policyId: p.id, x: 0, y: 0,
      search: (label + ' ' + str(b.company) + ' ' + str(b.ip) + ' ' + str(b.local_ip) + ' ' + p.id).toLowerCase(),
    };
  }

  function byLabel(a, b) {
    return a.label < b.label ? -1 : a.label > b.label ? 1 : (a.key < b.key ? -1 : a.key > b.key ? 1 : 0);
  }

  // Builds the nodes and edges, and lays them out: masters in a band on top; then one cell per
  // cluster (its operators in a column on the left, the cluster, its tables on the right), the
  // cells in a grid; then the operators of no known cluster, the publishers and the queries in
  // bands of their own. Deterministic: everything is sorted by name, then id.
  function build() {
    nodes = [];
    nodeByKey = new Map();
    edges = [];
    const byType = { master: [], operator: [], publisher: [], query: [], cluster: [] };
    for (const p of policies.values()) {
      if (byType[p.type]) byType[p.type].push(nodeFor(p));
    }
    for (const t in byType) byType[t].sort(byLabel);
    const clusters = byType.cluster;
    const clusterById = new Map(clusters.map((c) => [c.key, c]));
    const opsOf = new Map();
    const loose = [];
    for (const op of byType.operator) {
      const cid = str(policies.get(op.policyId).body.cluster);
      if (clusterById.has(cid)) {
        if (!opsOf.has(cid)) opsOf.set(cid, []);
        opsOf.get(cid).push(op);
      } else {
        loose.push(op);
      }
    }
    const ROW = 18, GAP = 40, CELL_W = 460, BAND_W = 180;
    const add = (n) => { nodes.push(n); nodeByKey.set(n.key, n); };
    let y = 0;
    const band = (list, width) => {
      if (!list.length) return;
      const perRow = Math.max(1, Math.floor(width / BAND_W));
      list.forEach((n, i) => {
        n.x = (i % perRow) * BAND_W;
        n.y = y + Math.floor(i / perRow) * 40;
        add(n);
      });
      y += Math.ceil(list.length / perRow) * 40 + GAP;
    };
    // About as wide as a screen is, for cells of three rows.
    const perRow = Math.max(1, Math.round(Math.sqrt((clusters.length * (3 * ROW + GAP) * 3.2) / CELL_W)));
    const width = Math.max(perRow * CELL_W, 1200);
    band(byType.master, width);
    for (let row = 0; row * perRow < clusters.length; row++) {
      let rowHeight = 0;
      for (let col = 0; col < perRow; col++) {
        const c = clusters[row * perRow + col];
        if (!c) break;
        const body = policies.get(c.policyId).body;
        const tables = Array.isArray(body.table) ? body.table : [];
        const ops = opsOf.get(c.key) || [];
        const rows = Math.max(ops.length, tables.length, 1);
        const x0 = col * CELL_W;
        c.x = x0 + 210;
        c.y = y + ((rows - 1) * ROW) / 2;
        add(c);
        ops.forEach((op, i) => {
          op.x = x0 + 150;
          op.y = y + i * ROW;
          op.inCluster = true;
          add(op);
          edges.push([op, c]);
        });
        tables.forEach((t, i) => {
          const name = str(t && t.dbms) + '.' + str(t && t.name);
          const n = {
            key: c.key + '/' + name + '/' + i, type: 'table', label: name, policyId: c.policyId,
            x: x0 + 260, y: y + i * ROW, search: name.toLowerCase(), extra: t,
          };
          add(n);
          edges.push([c, n]);
        });
        rowHeight = Math.max(rowHeight, rows * ROW);
      }
      y += rowHeight + GAP;
    }
    band(loose, width);
    band(byType.publisher, width);
    band(byType.query, width);
    streams(width);
    $('map-stats').textContent = nodes.length + ' nodes, ' + edges.length + ' edges';
  }

  // The streams as a tree below the policies: this master, then its subscribers, each relay's
  // subscribers in the row below it. A subscriber is keyed by its path (`via` and its name).
  function streams(width) {
    if (!subscribers.length) return;
    const root = { key: 'sub:', type: 'subscriber', label: 'this master', x: 0, y: 0, search: 'this master', extra: null };
    const byKey = new Map([[root.key, root]]);
    const depthOf = (s) => (s.via ? s.via.split('/').length : 0) + 1;
    const rows = [];
    for (const s of [...subscribers].sort((a, b) => depthOf(a) - depthOf(b) || (a.node_name < b.node_name ? -1 : 1))) {
      const path = (s.via ? s.via + '/' : '') + (s.node_name || s.peer || '?');
      const n = {
        key: 'sub:' + path, type: 'subscriber', x: 0, y: 0, extra: s,
        label: s.node_name + (s.lag ? ' (lag ' + s.lag + ')' : ''),
        search: (s.node_name + ' ' + s.peer + ' ' + s.identity + ' ' + s.via).toLowerCase(),
      };
      if (byKey.has(n.key)) continue;
      byKey.set(n.key, n);
      const depth = depthOf(s);
      (rows[depth] = rows[depth] || []).push(n);
    }
    rows[0] = [root];
    const y0 = nodes.length ? bounds(nodes).y1 + 60 : 0;
    const perRow = Math.max(1, Math.floor(width / BAND_W_STREAMS));
    let y = y0;
    for (const row of rows) {
      if (!row) continue;
      row.forEach((n, i) => {
        n.x = (i % perRow) * BAND_W_STREAMS;
        n.y = y + Math.floor(i / perRow) * 30;
        nodes.push(n);
        nodeByKey.set(n.key, n);
        const s = n.extra;
        if (s) {
          const parent = byKey.get('sub:' + (s.via || '')) || root;
          edges.push([parent, n]);
        }
      });
      y += Math.ceil(row.length / perRow) * 30 + 40;
    }
  }
  const BAND_W_STREAMS = 180;

  // ---- drawing ----
  const canvas = $('map');
  const ctx = canvas.getContext('2d');
  const view = { scale: 1, tx: 0, ty: 0 };
  let fitted = false;
  let framePending = false;

  function resize() {
    const r = canvas.getBoundingClientRect();
    const dpr = window.devicePixelRatio || 1;
    canvas.width = Math.max(1, Math.round(r.width * dpr));
    canvas.height = Math.max(1, Math.round(r.height * dpr));
  }

  function bounds(list) {
    let x0 = Infinity, y0 = Infinity, x1 = -Infinity, y1 = -Infinity;
    for (const n of list) {
      if (n.x < x0) x0 = n.x;
      if (n.y < y0) y0 = n.y;
      if (n.x > x1) x1 = n.x;
      if (n.y > y1) y1 = n.y;
    }
    return { x0, y0, x1, y1 };
  }

  function fit(list, maxScale) {
    if (!list.length) return;
    const b = bounds(list);
    if (list.length > 1) {
      // Room for the labels: operators' on their left, tables' on their right.
      b.x0 -= 140;
      b.x1 += 200;
      b.y0 -= 20;
    }
    const w = canvas.width, h = canvas.height;
    const scale = Math.min(maxScale, (w - 40) / Math.max(b.x1 - b.x0, 1), (h - 40) / Math.max(b.y1 - b.y0, 1));
    view.scale = Math.max(scale, 0.01);
    view.tx = w / 2 - ((b.x0 + b.x1) / 2) * view.scale;
    view.ty = h / 2 - ((b.y0 + b.y1) / 2) * view.scale;
  }

  function draw() {
    const w = canvas.width, h = canvas.height;
    ctx.setTransform(1, 0, 0, 1, 0, 0);
    ctx.fillStyle = '#fff';
    ctx.fillRect(0, 0, w, h);
    ctx.setTransform(view.scale, 0, 0, view.scale, view.tx, view.ty);
    // What is on the screen, in map coordinates (with a margin).
    const m = 20;
    const vx0 = (-view.tx) / view.scale - m, vy0 = (-view.ty) / view.scale - m;
    const vx1 = (w - view.tx) / view.scale + m, vy1 = (h - view.ty) / view.scale + m;
    const visible = (n) => n.x >= vx0 && n.x <= vx1 && n.y >= vy0 && n.y <= vy1;
    ctx.lineWidth = 1 / view.scale;
    ctx.strokeStyle = '#b9c2cf';
    ctx.beginPath();
    for (const [a, b] of edges) {
      if (!visible(a) && !visible(b)) continue;
      ctx.moveTo(a.x, a.y);
      ctx.lineTo(b.x, b.y);
    }
    ctx.stroke();
    // Nodes, one path a type; tiny when zoomed far out (squares draw faster than arcs).
    const pixel = 1 / view.scale;
    for (const type of TYPES) {
      ctx.fillStyle = COLORS[type];
      ctx.beginPath();
      const r = Math.max(RADIUS[type], 1.5 * pixel);
      const squares = r * view.scale < 3;
      for (const n of nodes) {
        if (n.type !== type || !visible(n)) continue;
        if (squares) {
          ctx.rect(n.x - r, n.y - r, 2 * r, 2 * r);
        } else {
          ctx.moveTo(n.x + r, n.y);
          ctx.arc(n.x, n.y, r, 0, 2 * Math.PI);
        }
      }
      ctx.fill();
    }
    // Search matches and the selected node.
    ctx.lineWidth = 3 * pixel;
    ctx.strokeStyle = '#ffb300';
    ctx.beginPath();
    for (const n of matches) {
      const r = RADIUS[n.type] + 4 * pixel;
      ctx.moveTo(n.x + r, n.y);
      ctx.arc(n.x, n.y, r, 0, 2 * Math.PI);
    }
    ctx.stroke();
    if (selected) {
      ctx.strokeStyle = '#000';
      ctx.beginPath();
      const r = RADIUS[selected.type] + 6 * pixel;
      ctx.arc(selected.x, selected.y, r, 0, 2 * Math.PI);
      ctx.stroke();
    }
    // Labels once they can be read.
    if (view.scale > 0.45) {
      ctx.fillStyle = '#1d2330';
      ctx.font = (view.scale > 1.5 ? 18 / view.scale : 12) + 'px system-ui, sans-serif';
      ctx.textBaseline = 'middle';
      for (const n of nodes) {
        if (!visible(n)) continue;
        const r = RADIUS[n.type];
        if (n.type === 'operator' && n.inCluster) {
          ctx.textAlign = 'right';
          ctx.fillText(n.label, n.x - r - 3, n.y);
        } else if (n.type === 'cluster') {
          ctx.textAlign = 'center';
          ctx.font = 'bold ' + ctx.font;
          ctx.fillText(n.label, n.x, n.y - r - 8);
          ctx.font = ctx.font.replace('bold ', '');
        } else {
          ctx.textAlign = 'left';
          ctx.fillText(n.label, n.x + r + 3, n.y);
        }
      }
    }
  }

  function redraw() {
    if (framePending) return;
    framePending = true;
    requestAnimationFrame(() => {
      framePending = false;
      draw();
    });
  }

  // Rebuilds the map from the model (after the first load, and after each change).
  function rebuild() {
    const t0 = performance.now();
    build();
    if (!fitted) {
      resize();
      fit(nodes, 1.2);
      fitted = nodes.length > 0;
    }
    applySearch(false);
    if (selected) selected = nodeByKey.get(selected.key) || null;
    draw();
    return performance.now() - t0;
  }

  // ---- pan, zoom, click ----
  let drag = null;
  canvas.addEventListener('pointerdown', (e) => {
    drag = { x: e.clientX, y: e.clientY, tx: view.tx, ty: view.ty, moved: false };
    canvas.setPointerCapture(e.pointerId);
    canvas.classList.add('dragging');
  });
  canvas.addEventListener('pointermove', (e) => {
    if (!drag) return;
    const dpr = window.devicePixelRatio || 1;
    const dx = (e.clientX - drag.x) * dpr, dy = (e.clientY - drag.y) * dpr;
    if (Math.abs(dx) + Math.abs(dy) > 3) drag.moved = true;
    view.tx = drag.tx + dx;
    view.ty = drag.ty + dy;
    redraw();
  });
  canvas.addEventListener('pointerup', (e) => {
    canvas.classList.remove('dragging');
    const wasDrag = drag && drag.moved;
    drag = null;
    if (!wasDrag) select(nodeAt(e));
  });
  canvas.addEventListener('wheel', (e) => {
    e.preventDefault();
    const dpr = window.devicePixelRatio || 1;
    const r = canvas.getBoundingClientRect();
    const px = (e.clientX - r.left) * dpr, py = (e.clientY - r.top) * dpr;
    const factor = Math.exp(-e.deltaY * 0.0015);
    const scale = Math.min(20, Math.max(0.005, view.scale * factor));
    view.tx = px - ((px - view.tx) / view.scale) * scale;
    view.ty = py - ((py - view.ty) / view.scale) * scale;
    view.scale = scale;
    redraw();
  }, { passive: false });
  window.addEventListener('resize', () => { resize(); redraw(); });

  function nodeAt(e) {
    const dpr = window.devicePixelRatio || 1;
    const r = canvas.getBoundingClientRect();
    const x = ((e.clientX - r.left) * dpr - view.tx) / view.scale;
    const y = ((e.clientY - r.top) * dpr - view.ty) / view.scale;
    let best = null, bestD = Infinity;
    const slack = 6 / view.scale;
    for (const n of nodes) {
      const d = Math.hypot(n.x - x, n.y - y);
      if (d < bestD && d <= RADIUS[n.type] + slack) { best = n; bestD = d; }
    }
    return best;
  }

  function select(n) {
    selected = n;
    const pre = $('policy-json');
    if (!n) {
      pre.textContent = 'click a node of the map';
    } else {
      const p = policies.get(n.policyId);
      const shown = n.type === 'subscriber' ? (n.extra || { this_master: window.__consoleInfo || null })
        : n.type === 'table' ? { table: n.extra, of_cluster: p ? p.policy : null } : (p ? p.policy : null);
      pre.textContent = JSON.stringify(shown, null, 2);
    }
    redraw();
  }

  // ---- search ----
  const search = $('search');
  function applySearch(center) {
    const q = search.value.trim().toLowerCase();
    matches = q ? nodes.filter((n) => n.search.includes(q)) : [];
    $('search-result').textContent = q ? matches.length + ' match' + (matches.length === 1 ? '' : 'es') : '';
    if (center && matches.length) {
      matchIndex = 0;
      // A few matches: framed and zoomed in; many: framed, never zoomed in.
      fit(matches, matches.length <= 30 ? 2 : view.scale);
      redraw();
    }
  }
  search.addEventListener('input', () => { applySearch(true); redraw(); });
  search.addEventListener('keydown', (e) => {
    if (e.key === 'Enter' && matches.length) {
      matchIndex = (matchIndex + 1) % matches.length;
      const n = matches[matchIndex];
      fit([n], 2);
      select(n);
    }
  });

  // ---- legend ----
  $('legend').replaceChildren(...TYPES.map((t) => {
    const s = document.createElement('span');
    const i = document.createElement('i');
    i.style.background = COLORS[t];
    s.append(i, t);
    return s;
  }));

  // ---- info ----
  async function getJson(path) {
    const r = await fetch(path, { credentials: 'same-origin', cache: 'no-store' });
    if (!r.ok) throw new Error(path + ': ' + r.status + ' ' + (await r.text()));
    return r.json();
  }

  function setText(id, text, cls) {
    const el = $(id);
    el.textContent = text;
    el.className = cls || '';
  }

  let infoTimer = null;
  async function loadInfo() {
    try {
      const info = await getJson('/api/info');
      setText('head-seq', str(info.head_seq));
      setText('policy-count', str(info.policy_count));
      setText('digest', str(info.digest), 'mono');
      const h = info.health;
      setText('health-database', h.database, h.database === 'up' ? 'good' : 'bad');
      setText('health-writes', h.writes, h.writes_ok ? 'good' : 'bad');
      setText('health-streams', str(h.streams) + (h.ready ? '' : ' (no copy yet)'), h.ready ? '' : 'bad');
      const body = $('counts').tBodies[0];
      body.replaceChildren(...Object.keys(info.counts).map((type) => {
        const tr = document.createElement('tr');
        tr.dataset.type = type;
        const a = document.createElement('td');
        a.textContent = type;
        const b = document.createElement('td');
        b.className = 'num count';
        b.textContent = info.counts[type];
        tr.append(a, b);
        return tr;
      }));
      window.__consoleInfo = info;
    } catch (e) {
      setText('health-database', String(e.message || e), 'bad');
    }
  }
  function infoSoon() {
    if (infoTimer) return;
    infoTimer = setTimeout(() => { infoTimer = null; loadInfo(); }, 250);
  }

  // ---- subscribers: by lag, under the relay they come through ----
  function cell(text, cls) {
    const td = document.createElement('td');
    td.textContent = text;
    if (cls) td.className = cls;
    return td;
  }
  async function loadSubscribers() {
    let subs;
    try {
      subs = await getJson('/api/subscribers');
    } catch (e) {
      return;
    }
    const byLag = (a, b) => b.lag - a.lag || (a.node_name < b.node_name ? -1 : 1);
    const names = new Set();
    for (const s of subs) { if (s.node_name) names.add(s.node_name); if (s.peer) names.add(s.peer); }
    const children = new Map();
    for (const s of subs) {
      const key = s.via || '';
      if (!children.has(key)) children.set(key, []);
      children.get(key).push(s);
    }
    const rows = [];
    const seen = new Set();
    const walk = (key, depth) => {
      for (const s of (children.get(key) || []).sort(byLag)) {
        if (seen.has(s)) continue;
        seen.add(s);
        const tr = document.createElement('tr');
        tr.dataset.node = s.node_name;
        tr.dataset.lag = s.lag;
        if (s.lag > 0) tr.className = 'lagging';
        const name = cell('\u00a0\u00a0'.repeat(depth) + (depth ? '└ ' : '') + (s.node_name || '?'));
        tr.append(name, cell(s.peer), cell(s.identity), cell(s.version),
          cell(s.since_unix_ms ? new Date(s.since_unix_ms).toLocaleTimeString() : ''),
          cell(s.sent_seq, 'num'), cell(s.durable_seq, 'num'), cell(s.lag, 'num lag'),
          cell(s.bytes_sent, 'num'), cell(s.via));
        rows.push(tr);
        if (s.node_name) walk(s.node_name, depth + 1);
        if (s.peer && s.peer !== s.node_name) walk(s.peer, depth + 1);
      }
    };
    walk('', 0);
    // Relays that are not themselves subscribers here: a group row each.
    for (const key of [...children.keys()].sort()) {
      if (key === '' || names.has(key)) continue;
      const tr = document.createElement('tr');
      tr.className = 'relay-group';
      const td = cell('via ' + key);
      td.colSpan = 10;
      tr.append(td);
      rows.push(tr);
      walk(key, 1);
    }
    $('subscribers').tBodies[0].replaceChildren(...rows);
    window.__consoleSubscribers = subs;
    subscribers = subs;
    // Lags change every second: the map's labels follow, its layout only when the tree does.
    const tree = subs.map((s) => s.via + '/' + s.node_name).sort().join('\n');
    if (tree !== subscriberTree) {
      subscriberTree = tree;
      scheduleRebuild();
    } else {
      for (const s of subs) {
        const n = nodeByKey.get('sub:' + (s.via ? s.via + '/' : '') + (s.node_name || s.peer || '?'));
        if (n) { n.extra = s; n.label = s.node_name + (s.lag ? ' (lag ' + s.lag + ')' : ''); }
      }
      redraw();
    }
  }

  // ---- the live feed ----
  const feedList = $('feed');
  function feedLine(c) {
    const li = document.createElement('li');
    li.dataset.id = c.id;
    li.dataset.seq = c.seq;
    li.className = c.op;
    let text = '#' + c.seq + ' ' + c.op + ' ';
    if (c.op === 'insert') {
      const body = c.policy[c.type] || {};
      text += c.type + ' ' + str(body.name || c.id);
    } else {
      text += c.id;
    }
    li.textContent = text;
    feedList.prepend(li);
    while (feedList.childElementCount > 200) feedList.lastElementChild.remove();
  }

  let source = null;
  let snapshotting = false;
  function connect() {
    source = new EventSource('/api/feed?after=' + headSeq);
    source.onopen = () => { setText('feed-state', 'live', 'good'); window.__feedOpen = true; infoSoon(); };
    source.onerror = () => { setText('feed-state', 'reconnecting', 'bad'); };
    source.addEventListener('change', (e) => {
      const c = JSON.parse(e.data);
      headSeq = c.seq;
      if (c.op === 'insert') addPolicy(c.policy, c.seq);
      else policies.delete(c.id);
      feedLine(c);
      scheduleRebuild();
      infoSoon();
    });
    source.addEventListener('progress', () => infoSoon());
    // Behind what the master can replay (or at 0): the whole ledger again, then live changes.
    source.addEventListener('reset', (e) => {
      policies.clear();
      headSeq = JSON.parse(e.data).seq;
      snapshotting = true;
    });
    source.addEventListener('snapshot', (e) => {
      const p = JSON.parse(e.data);
      addPolicy(p.policy, p.seq);
    });
    source.addEventListener('caught_up', (e) => {
      headSeq = JSON.parse(e.data).seq;
      if (snapshotting) {
        snapshotting = false;
        scheduleRebuild();
        infoSoon();
      }
    });
    source.addEventListener('error', (e) => {
      // A server's `event: error` (the stream ended); the browser reconnects by itself.
      if (e.data) setText('feed-state', 'ended: ' + JSON.parse(e.data).message, 'bad');
    });
  }

  let rebuildPending = false;
  function scheduleRebuild() {
    if (rebuildPending) return;
    rebuildPending = true;
    requestAnimationFrame(() => { rebuildPending = false; rebuild(); });
  }

  async function reload() {
    const t0 = performance.now();
    const data = await getJson('/api/policies');
    const fetched = performance.now();
    policies.clear();
    headSeq = data.head_seq;
    data.policies.forEach((p, i) => addPolicy(p, i));
    const t1 = performance.now();
    const drawn = rebuild();
    window.__mapRenderMs = (performance.now() - t1);
    window.__mapLoadMs = { fetch: fetched - t0, parse: t1 - fetched, render: drawn, total: performance.now() - t0 };
    connect();
  }

  // ---- the page's hooks for tests ----
  window.__console = {
    hasNode: (key) => nodeByKey.has(key),
    // The nodes drawn from policies (the streams' tree is counted apart).
    nodeCount: () => nodes.filter((n) => n.type !== 'subscriber').length,
    subscriberNodes: () => nodes.filter((n) => n.type === 'subscriber').map((n) => n.key),
    neighbours: (key) => edges.filter(([a, b]) => a.key === key || b.key === key)
      .map(([a, b]) => (a.key === key ? b.key : a.key)),
    edgeCount: () => edges.length,
    policyCount: () => policies.size,
    render: () => { const t = performance.now(); resize(); fit(nodes, 1.2); draw(); return performance.now() - t; },
    drawMs: () => { const t = performance.now(); draw(); return performance.now() - t; },
    scale: () => view.scale,
    nodeScreenPosition: (key) => {
      const n = nodeByKey.get(key);
      if (!n) return null;
      const dpr = window.devicePixelRatio || 1;
      const r = canvas.getBoundingClientRect();
      return { x: r.left + (n.x * view.scale + view.tx) / dpr, y: r.top + (n.y * view.scale + view.ty) / dpr };
    },
    matches: () => matches.map((n) => n.key),
  };

  (async () => {
    resize();
    await Promise.all([loadInfo(), loadSubscribers(), reload()]);
    setInterval(loadInfo, 5000);
    setInterval(loadSubscribers, 1000);
    window.__consoleReady = true;
  })().catch((e) => {
    setText('feed-state', 'failed: ' + (e.message || e), 'bad');
    console.error(e);
  });
})();
