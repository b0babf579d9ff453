// falco-nats ui: alerts and the responders' decisions, live.
//
// Everything in an alert was written by whoever controls the watched
// container. Nothing from one is ever parsed as HTML: rows are built with
// createElement and textContent only (and the page's Content-Security-Policy
// forbids inline script besides).
'use strict';

(function () {
  const PRIORITIES = ['emergency', 'alert', 'critical', 'error', 'warning', 'notice', 'informational', 'debug'];
  const COLORS = {
    emergency: '#ff4d6d', alert: '#ff5c5c', critical: '#e5484d', error: '#f76b15',
    warning: '#f5d90a', notice: '#3e9bf5', informational: '#46a758', debug: '#8b949e',
  };
  // What the page keeps and shows, at most: a page left open for days
  // stays the same size.
  const KEEP = 5000;
  const MAX_ROWS = 500;
  const PENDING_DECISIONS = 2000;
  const FLUSH_MS = 100;

  const $ = (id) => document.getElementById(id);
  const rows = $('rows');
  const state = {
    all: [],            // alerts, oldest first: {seq, key, alert, subject, decisions, at}
    byKey: new Map(),   // join key -> alert item
    pending: new Map(), // join key -> decisions that came before their alert
    shown: 0,           // highest seq rendered
    instance: null,     // the ui's instance the seqs belong to
    missed: 0,          // events that passed while this page was too far behind
    paused: false,
    waiting: 0,         // alerts arrived while paused
    filter: { priority: 7, rule: '', namespace: '', pod: '', text: '' },
    dirty: false,
    rebuild: false,
  };

  // The token came in the URL once; the server keeps it in a cookie.
  if (new URLSearchParams(location.search).has('token')) {
    history.replaceState(null, '', location.pathname);
  }

  const str = (v) => (typeof v === 'string' ? v : v === undefined || v === null ? '' : JSON.stringify(v));
  const priorityOf = (p) => {
    const name = str(p).toLowerCase();
    return PRIORITIES.includes(name) ? name : 'unknown';
  };
  const rank = (name) => { const i = PRIORITIES.indexOf(name); return i < 0 ? 7 : i; };
  const fields = (a) => (a && typeof a.output_fields === 'object' && a.output_fields) || {};
  const alertKey = (a) => str(a.time) + '|' + str(a.rule) + '|' + str(a.hostname);
  const decisionKey = (d) => str(d.alert_time) + '|' + str(d.rule) + '|' + str(d.hostname);

  function timeOf(a, fallback) {
    // Falco writes nanoseconds; Date takes milliseconds.
    const t = Date.parse(str(a.time).replace(/(\.\d{3})\d+/, '$1'));
    return Number.isFinite(t) ? t : fallback;
  }

  function clock(ms) {
    const d = new Date(ms);
    const pad = (n, w) => String(n).padStart(w || 2, '0');
    return pad(d.getHours()) + ':' + pad(d.getMinutes()) + ':' + pad(d.getSeconds()) + '.' + pad(d.getMilliseconds(), 3);
  }

  function matches(item) {
    const f = state.filter;
    const a = item.alert;
    if (rank(priorityOf(a.priority)) > f.priority) return false;
    const has = (value, needle) => !needle || str(value).toLowerCase().includes(needle);
    const fl = fields(a);
    if (!has(a.rule, f.rule)) return false;
    if (!has(fl['k8s.ns.name'], f.namespace)) return false;
    if (!has(fl['k8s.pod.name'], f.pod)) return false;
    if (f.text) {
      const all = [a.rule, a.output, a.hostname, a.source, JSON.stringify(fl)].map(str).join('\n').toLowerCase();
      if (!all.includes(f.text)) return false;
    }
    return true;
  }

  const VERBS = { 'delete-pod': ['deleted', 'delete'], 'label-pod': ['labelled', 'label'], 'isolate-pod': ['isolated', 'isolate'], log: ['logged', 'log'] };

  function describe(d) {
    const action = str(d.action);
    const outcome = str(d.outcome);
    const reason = str(d.reason);
    const verbs = VERBS[action] || [action, action];
    if (action === 'none') return reason === 'no_policy_match' ? 'no rule matched' : 'no action: ' + reason.split(':')[0];
    switch (outcome) {
      case 'done': return verbs[0];
      case 'dry_run': return 'would ' + verbs[1];
      case 'skipped': return action + ' skipped: ' + reason.split(':')[0];
      case 'failed': return action + ' failed';
      default: return action + ' ' + outcome;
    }
  }

  function responseCell(td, item) {
    td.replaceChildren();
    for (const d of item.decisions) {
      const span = document.createElement('span');
      const outcome = str(d.action) === 'none' ? 'none' : str(d.outcome);
      span.className = 'o-' + (['done', 'dry_run', 'skipped', 'failed', 'gone', 'replaced', 'none'].includes(outcome) ? outcome : 'none');
      span.textContent = describe(d);
      span.title = str(d.reason);
      td.appendChild(span);
    }
  }

  function cell(tr, text, cls) {
    const td = document.createElement('td');
    if (cls) td.className = cls;
    td.textContent = text;
    td.title = text;
    tr.appendChild(td);
    return td;
  }

  function row(item) {
    const a = item.alert;
    const fl = fields(a);
    const tr = document.createElement('tr');
    tr.className = 'alert';
    tr.dataset.seq = String(item.seq);
    const time = cell(tr, clock(item.at));
    time.title = str(a.time);
    const p = priorityOf(a.priority);
    const ptd = document.createElement('td');
    const badge = document.createElement('span');
    badge.className = 'prio p-' + p;
    badge.textContent = str(a.priority) || '?';
    ptd.appendChild(badge);
    tr.appendChild(ptd);
    cell(tr, str(a.rule), 'rule');
    const ns = str(fl['k8s.ns.name']);
    const pod = str(fl['k8s.pod.name']);
    cell(tr, ns || pod ? ns + ' / ' + pod : '', 'pod');
    const out = document.createElement('td');
    out.className = 'output';
    const text = document.createElement('div');
    text.textContent = str(a.output);
    out.title = str(a.output);
    out.appendChild(text);
    tr.appendChild(out);
    const resp = document.createElement('td');
    resp.className = 'response';
    tr.appendChild(resp);
    responseCell(resp, item);
    item.row = tr;
    return tr;
  }

  function schedule(rebuild) {
    state.dirty = true;
    if (rebuild) state.rebuild = true;
  }

  // Renders what changed, at most every FLUSH_MS: new alerts at the top,
  // the oldest rows out past MAX_ROWS; a full rebuild after a filter change.
  function flush() {
    if (!state.dirty) return;
    state.dirty = false;
    const newest = state.all.length ? state.all[state.all.length - 1].seq : 0;
    if (state.paused) {
      $('pause').textContent = 'Resume (' + state.waiting + ' new)';
      updateCounts();
      return;
    }
    const fresh = [];
    if (!state.rebuild) {
      for (let i = state.all.length - 1; i >= 0 && state.all[i].seq > state.shown; i--) {
        if (matches(state.all[i])) fresh.push(state.all[i]);
        if (fresh.length > MAX_ROWS) { state.rebuild = true; break; }
      }
    }
    if (state.rebuild) {
      state.rebuild = false;
      const frag = document.createDocumentFragment();
      let n = 0;
      for (let i = state.all.length - 1; i >= 0 && n < MAX_ROWS; i--) {
        const item = state.all[i];
        if (matches(item)) { frag.appendChild(row(item)); n++; }
      }
      rows.replaceChildren(frag);
    } else if (fresh.length) {
      const frag = document.createDocumentFragment();
      for (const item of fresh) frag.appendChild(row(item));
      rows.insertBefore(frag, rows.firstChild);
      while (rows.childElementCount > MAX_ROWS) rows.lastElementChild.remove();
    }
    state.shown = newest;
    updateCounts();
    drawChart();
  }

  function updateCounts() {
    $('counts').textContent = rows.childElementCount + ' shown of ' + state.all.length + ' kept';
  }

  function addAlert(ev, msg) {
    const alert = msg && typeof msg === 'object' ? msg : { output: str(msg), priority: '?', rule: '(not a Falco alert)' };
    const item = { seq: ev.seq, key: alertKey(alert), alert, subject: str(ev.subject), decisions: [], at: timeOf(alert, Date.now()) };
    state.all.push(item);
    state.byKey.set(item.key, item);
    const early = state.pending.get(item.key);
    if (early) { item.decisions.push(...early); state.pending.delete(item.key); }
    if (state.all.length > KEEP) {
      for (const old of state.all.splice(0, state.all.length - KEEP)) {
        if (state.byKey.get(old.key) === old) state.byKey.delete(old.key);
      }
    }
    if (state.paused) state.waiting++;
    schedule(false);
  }

  function addDecision(msg) {
    if (!msg || typeof msg !== 'object') return;
    const key = decisionKey(msg);
    const item = state.byKey.get(key);
    if (!item) {
      const list = state.pending.get(key) || [];
      list.push(msg);
      state.pending.set(key, list);
      while (state.pending.size > PENDING_DECISIONS) state.pending.delete(state.pending.keys().next().value);
      return;
    }
    item.decisions.push(msg);
    if (item.row && item.row.isConnected) {
      responseCell(item.row.lastElementChild, item);
    }
  }

  function drawChart() {
    const canvas = $('chart');
    const ctx = canvas.getContext('2d');
    const width = canvas.width;
    const height = canvas.height;
    const minute = 60000;
    const now = Math.floor(Date.now() / minute);
    const buckets = Array.from({ length: 60 }, () => new Array(PRIORITIES.length).fill(0));
    for (const item of state.all) {
      const age = now - Math.floor(item.at / minute);
      if (age < 0 || age >= 60) continue;
      const p = rank(priorityOf(item.alert.priority));
      buckets[59 - age][p]++;
    }
    const peak = Math.max(1, ...buckets.map((b) => b.reduce((x, y) => x + y, 0)));
    ctx.clearRect(0, 0, width, height);
    const w = width / 60;
    buckets.forEach((b, i) => {
      let y = height;
      for (let p = PRIORITIES.length - 1; p >= 0; p--) {
        if (!b[p]) continue;
        const h = (b[p] / peak) * (height - 14);
        ctx.fillStyle = COLORS[PRIORITIES[p]];
        ctx.fillRect(i * w + 1, y - h, w - 2, h);
        y -= h;
      }
    });
    ctx.fillStyle = '#8b949e';
    ctx.font = '10px sans-serif';
    ctx.fillText(peak + '/min', 2, 10);
  }

  function legend() {
    const box = $('legend');
    for (const p of PRIORITIES) {
      const span = document.createElement('span');
      span.textContent = p;
      span.style.color = COLORS[p];
      box.appendChild(span);
    }
  }

  function showDetail(item) {
    $('detail-title').textContent = str(item.alert.rule) + ' (' + item.subject + ')';
    const shown = { alert: item.alert, decisions: item.decisions };
    $('detail-json').textContent = JSON.stringify(shown, null, 2);
    $('detail').hidden = false;
  }

  rows.addEventListener('click', (e) => {
    const tr = e.target.closest('tr.alert');
    if (!tr) return;
    const seq = Number(tr.dataset.seq);
    const item = state.all.find((i) => i.seq === seq);
    if (item) showDetail(item);
  });
  $('detail-close').addEventListener('click', () => { $('detail').hidden = true; });

  $('pause').addEventListener('click', () => {
    state.paused = !state.paused;
    const b = $('pause');
    b.classList.toggle('on', state.paused);
    if (!state.paused) { state.waiting = 0; b.textContent = 'Pause'; schedule(true); }
    else b.textContent = 'Resume (0 new)';
  });

  const inputs = { 'f-rule': 'rule', 'f-namespace': 'namespace', 'f-pod': 'pod', 'f-text': 'text' };
  for (const [id, key] of Object.entries(inputs)) {
    $(id).addEventListener('input', (e) => { state.filter[key] = e.target.value.trim().toLowerCase(); schedule(true); });
  }
  $('f-priority').addEventListener('change', (e) => { state.filter.priority = Number(e.target.value); schedule(true); });

  function setStatus(text, cls) {
    const s = $('status');
    s.textContent = text;
    s.className = 'status ' + (cls || '');
  }

  function connect() {
    const source = new EventSource('events');
    source.addEventListener('hello', (e) => {
      const hello = JSON.parse(e.data);
      // Another instance of the ui (it restarted): its numbers begin
      // again, so start afresh. The same one: keep what the page holds,
      // resumed or not (then it says how many went by).
      if (hello.instance !== state.instance) {
        state.instance = hello.instance;
        state.all = []; state.byKey.clear(); state.pending.clear(); state.shown = 0; state.missed = 0;
        schedule(true);
      } else if (!hello.resumed) {
        state.missed += Number(hello.missed) || 0;
      }
      const source = hello.stream ? 'history from stream ' + hello.stream : 'live only (core NATS)';
      $('source').textContent = source + (state.missed ? '; ' + state.missed + ' missed while this page was behind' : '');
      setStatus('live', 'live');
    });
    const parse = (e) => { try { return JSON.parse(e.data); } catch (_) { return null; } };
    source.addEventListener('alert', (e) => { const ev = parse(e); if (ev) addAlert(ev, ev.msg); });
    source.addEventListener('decision', (e) => { const ev = parse(e); if (ev) addDecision(ev.msg); });
    source.addEventListener('dropped', () => setStatus('catching up', ''));
    source.onerror = () => setStatus('reconnecting', 'down');
  }

  legend();
  setInterval(flush, FLUSH_MS);
  setInterval(() => schedule(false), 10000); // the chart's minutes move on
  connect();
}());
