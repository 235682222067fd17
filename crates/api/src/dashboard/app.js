// The Flotilla dashboard: plain DOM, no framework, no build step. Every view reads the API with
// the token kept in this tab's sessionStorage, and reads again when the event stream
// (GET /api/events, read with fetch so that the token goes in a header, never in a URL) says
// that something it shows changed.
'use strict';

const TOKEN_KEY = 'flotilla.token';
const TRACE_KEY = 'flotilla.traceViewer';
const RUN_STATUSES = ['running', 'paused', 'failing', 'needs_attention', 'success', 'failure', 'cancelled'];
const ENDED = new Set(['success', 'failure', 'cancelled']);
const PAGE_SIZE = 25;
const SVG = 'http://www.w3.org/2000/svg';

const $ = (id) => document.getElementById(id);

// ---- DOM helpers: text goes in as text, never as markup.

function h(tag, attrs, ...children) {
  const el = document.createElement(tag);
  return fill(el, attrs, children);
}

function s(tag, attrs, ...children) {
  const el = document.createElementNS(SVG, tag);
  return fill(el, attrs, children);
}

function fill(el, attrs, children) {
  for (const [key, value] of Object.entries(attrs || {})) {
    if (value === undefined || value === null || value === false) continue;
    if (key.startsWith('on')) el.addEventListener(key.slice(2), value);
    else el.setAttribute(key, value === true ? '' : String(value));
  }
  for (const child of children.flat()) {
    if (child === undefined || child === null || child === false) continue;
    el.append(child instanceof Node ? child : document.createTextNode(String(child)));
  }
  return el;
}

function badge(status) {
  return h('span', { class: `badge st-${status}` }, status.replace('_', ' '));
}

function when(iso) {
  return iso ? new Date(iso).toLocaleString() : '—';
}

function duration(ms) {
  if (ms === undefined || ms === null) return '—';
  if (ms < 1000) return `${Math.round(ms)} ms`;
  const secs = ms / 1000;
  if (secs < 60) return `${secs.toFixed(1)} s`;
  const mins = Math.floor(secs / 60);
  if (mins < 60) return `${mins} min ${Math.round(secs % 60)} s`;
  return `${Math.floor(mins / 60)} h ${mins % 60} min`;
}

function since(start, end) {
  return (end ? new Date(end) : new Date()) - new Date(start);
}

// ---- The API.

class Unauthorized extends Error {}

async function api(path, options = {}) {
  const headers = { Authorization: `Bearer ${sessionStorage.getItem(TOKEN_KEY)}` };
  if (options.body !== undefined) headers['Content-Type'] = 'application/json';
  const response = await fetch(path, {
    method: options.method || 'GET',
    headers,
    body: options.body === undefined ? undefined : JSON.stringify(options.body),
    cache: 'no-store',
  });
  if (response.status === 401) throw new Unauthorized('the token is not valid (unknown, revoked or expired)');
  const text = await response.text();
  const body = text ? JSON.parse(text) : null;
  if (!response.ok) {
    const message = body && body.error ? body.error.message : `${response.status} ${response.statusText}`;
    throw new Error(message);
  }
  return body;
}

function toast(message) {
  const el = $('toast');
  el.textContent = message;
  el.hidden = false;
  clearTimeout(toast.timer);
  toast.timer = setTimeout(() => { el.hidden = true; }, 8000);
}

// ---- The event stream.

const live = { abort: null, pending: null, timer: null, last: 0, generation: 0 };

async function listen() {
  // A sign-out ends this loop; a new sign-in starts another.
  const generation = ++live.generation;
  let delay = 1000;
  while (generation === live.generation && sessionStorage.getItem(TOKEN_KEY)) {
    const abort = new AbortController();
    live.abort = abort;
    try {
      const response = await fetch('/api/events', {
        headers: { Authorization: `Bearer ${sessionStorage.getItem(TOKEN_KEY)}` },
        signal: abort.signal,
        cache: 'no-store',
      });
      if (response.status === 401) { signOut('Your token is no longer valid: sign in again.'); return; }
      if (!response.ok) throw new Error(`${response.status}`);
      const reader = response.body.pipeThrough(new TextDecoderStream()).getReader();
      let buffer = '';
      for (;;) {
        const { value, done } = await reader.read();
        if (done) break;
        buffer += value;
        let end;
        while ((end = buffer.indexOf('\n\n')) >= 0) {
          const block = buffer.slice(0, end);
          buffer = buffer.slice(end + 2);
          received(block);
          delay = 1000;
        }
      }
    } catch (e) {
      if (abort.signal.aborted) return;
    }
    setLive(false);
    await new Promise((resolve) => setTimeout(resolve, delay));
    delay = Math.min(delay * 2, 15000);
  }
}

function received(block) {
  let name = 'message';
  const data = [];
  for (const line of block.split('\n')) {
    if (line.startsWith('event:')) name = line.slice(6).trim();
    else if (line.startsWith('data:')) data.push(line.slice(5).trim());
  }
  if (name !== 'runs') return;
  setLive(true);
  const { runs } = JSON.parse(data.join('\n') || '{}');
  changed(runs === undefined ? null : runs);
}

function setLive(on) {
  const el = $('live');
  el.textContent = on ? '● Live' : '○ Reconnecting…';
  el.classList.toggle('off', !on);
}

// Changes are gathered and the view reads again at most every 500 ms (the views that read many
// things at once: every 2 s), however many changes arrive.
function changed(runs) {
  if (live.pending !== 'all') {
    if (runs === null) live.pending = 'all';
    else live.pending = new Set([...(live.pending || []), ...runs]);
  }
  if (live.timer) return;
  const every = (view.current && view.current.every) || 500;
  const wait = Math.max(0, live.last + every - Date.now());
  live.timer = setTimeout(() => {
    const pending = live.pending;
    live.pending = null;
    live.timer = null;
    live.last = Date.now();
    if (view.current && view.current.changed) view.current.changed(pending === 'all' ? null : pending);
  }, wait);
}

// ---- Views, by the location's hash.

const view = { current: null };

function route() {
  const [path, query] = location.hash.replace(/^#/, '').split('?');
  const parts = path.split('/').filter(Boolean);
  const params = new URLSearchParams(query || '');
  for (const link of document.querySelectorAll('#nav a')) {
    const current = `#/${parts[0] || 'runs'}` === link.getAttribute('href');
    if (current) link.setAttribute('aria-current', 'page'); else link.removeAttribute('aria-current');
  }
  // Each view gets an element of its own: a read the last view started before the location
  // changed then renders into an element no longer on the page, never over the new view.
  const root = h('div');
  $('view').replaceChildren(root);
  if (parts[0] === 'runs' && parts[1]) view.current = runView(root, decodeURIComponent(parts[1]));
  else if (parts[0] === 'agents') view.current = agentsView(root);
  else if (parts[0] === 'metrics') view.current = metricsView(root, params);
  else if (parts[0] === 'failures') view.current = failuresView(root);
  else view.current = runsView(root, params);
  view.current.load().catch(failed);
}

function failed(error) {
  if (error instanceof Unauthorized) signOut('Your token is no longer valid: sign in again.');
  else toast(error.message);
}

// Runs the view's load, then again once more if changes came meanwhile: never two at once.
function loader(load) {
  let running = null;
  let again = false;
  const run = async () => {
    if (running) { again = true; return running; }
    running = (async () => {
      do { again = false; await load(); } while (again);
    })().finally(() => { running = null; });
    return running;
  };
  return run;
}

// -- Runs.

function runsView(root, params) {
  const status = params.get('status') || '';
  const name = params.get('name') || '';
  const from = params.get('since') || '';
  const cursor = params.get('cursor') || '';
  const form = h('form', { class: 'filters', 'aria-label': 'Filter runs' },
    h('label', {}, 'Status ',
      h('select', { name: 'status' }, h('option', { value: '' }, 'any'),
        RUN_STATUSES.map((st) => h('option', { value: st, selected: st === status }, st.replace('_', ' '))))),
    h('label', {}, 'Definition ', h('input', { name: 'name', value: name, placeholder: 'name', spellcheck: 'false' })),
    h('label', {}, 'Started after ', h('input', { name: 'since', type: 'datetime-local', value: from })),
    h('button', { type: 'submit' }, 'Apply'));
  form.addEventListener('submit', (e) => {
    e.preventDefault();
    const data = new FormData(form);
    const next = new URLSearchParams();
    for (const key of ['status', 'name', 'since']) if (data.get(key)) next.set(key, data.get(key));
    location.hash = `#/runs?${next}`;
  });
  const body = h('tbody');
  const pager = h('nav', { class: 'pager', 'aria-label': 'Pages' });
  root.append(h('h2', {}, 'Runs'), form,
    h('table', { class: 'runs' },
      h('caption', { class: 'sr-only' }, 'Runs, newest first'),
      h('thead', {}, h('tr', {}, ['Status', 'Definition', 'Run', 'Started', 'Duration'].map((c) => h('th', { scope: 'col' }, c)))),
      body),
    pager);
  let shown = new Set();
  const load = loader(async () => {
    const query = new URLSearchParams({ limit: PAGE_SIZE });
    if (status) query.set('status', status);
    if (name) query.set('name', name);
    if (from) query.set('since', new Date(from).toISOString());
    if (cursor) query.set('cursor', cursor);
    const page = await api(`/api/workflows?${query}`);
    shown = new Set(page.workflows.map((r) => r.workflowId));
    body.replaceChildren(...page.workflows.map((r) => h('tr', { 'data-run': r.workflowId, 'data-status': r.status },
      h('td', {}, badge(r.status)),
      h('td', {}, r.name),
      h('td', {}, h('a', { href: `#/runs/${r.workflowId}`, class: 'mono', 'aria-label': `Run ${r.workflowId} of ${r.name}` }, r.workflowId.slice(0, 8))),
      h('td', {}, when(r.startTime)),
      h('td', {}, duration(r.duration !== undefined ? r.duration : since(r.startTime))))));
    if (!page.workflows.length) body.append(h('tr', {}, h('td', { colspan: 5, class: 'empty' }, 'No run matches.')));
    const here = new URLSearchParams(params);
    here.delete('cursor');
    pager.replaceChildren(
      cursor ? h('a', { href: `#/runs?${here}` }, '← Newest') : '',
      page.nextCursor ? h('a', { href: `#/runs?${new URLSearchParams([...here, ['cursor', page.nextCursor]])}` }, 'Older →') : '');
  });
  return {
    load,
    // A new run may belong on the first page; a later page changes only with its own runs.
    changed: (runs) => {
      if (runs === null || !cursor || [...runs].some((id) => shown.has(id))) load().catch(failed);
    },
  };
}

// -- One run.

function runView(root, id) {
  let selected = null;
  let latest = null;
  const load = loader(async () => {
    const [run, report] = await Promise.all([
      api(`/api/workflows/${encodeURIComponent(id)}`),
      api(`/api/workflows/${encodeURIComponent(id)}/report`),
    ]);
    latest = { run, report };
    render();
  });
  const act = async (path, label, confirmation, body = {}) => {
    if (confirmation && !window.confirm(confirmation)) return;
    try {
      const answer = await api(path, { method: 'POST', body });
      toast(`${label}: the run is ${answer.status.replace('_', ' ')}`);
      await load();
    } catch (e) { failed(e); }
  };
  const runPath = `/api/workflows/${encodeURIComponent(id)}`;

  function render() {
    const { run, report } = latest;
    const byId = new Map(report.steps.map((st) => [st.stepId, st]));
    const ended = ENDED.has(run.status);
    const trace = localStorage.getItem(TRACE_KEY);
    const actions = h('div', { class: 'actions', role: 'group', 'aria-label': 'Run actions' },
      h('button', { type: 'button', id: 'cancel', disabled: ended, onclick: () => act(`${runPath}/cancel`, 'Cancelled', `Cancel run ${run.name}? Its unfinished steps end cancelled.`) }, 'Cancel'),
      h('button', { type: 'button', id: 'pause', disabled: ended || run.status === 'paused', onclick: () => act(`${runPath}/pause`, 'Paused') }, 'Pause'),
      h('button', { type: 'button', id: 'resume', disabled: run.status !== 'paused', onclick: () => act(`${runPath}/resume`, 'Resumed') }, 'Resume'),
      h('button', { type: 'button', id: 'retry', disabled: !['failure', 'needs_attention'].includes(run.status), onclick: () => act(`${runPath}/retry`, 'Retried') }, 'Retry'));
    const facts = h('dl', { class: 'facts' },
      h('dt', {}, 'Status'), h('dd', { id: 'run-status', 'data-status': run.status }, badge(run.status)),
      h('dt', {}, 'Run'), h('dd', { class: 'mono' }, run.workflowId),
      h('dt', {}, 'Started'), h('dd', {}, when(run.startTime)),
      h('dt', {}, 'Duration'), h('dd', {}, duration(run.duration !== undefined ? run.duration : since(run.startTime))),
      h('dt', {}, 'Steps'), h('dd', {}, `${run.metrics.successfulSteps} succeeded, ${run.metrics.failedSteps} failed, ${run.metrics.skippedSteps} skipped of ${run.metrics.totalSteps}`),
      h('dt', {}, 'Trace'), h('dd', { class: 'mono' }, trace
        ? h('a', { href: `${trace.replace(/\/$/, '')}/trace/${run.traceId}`, target: '_blank', rel: 'noopener noreferrer' }, run.traceId)
        : run.traceId),
      run.parent ? [h('dt', {}, 'Started by'), h('dd', {}, h('a', { href: `#/runs/${run.parent.workflowId}` }, `step ${run.parent.stepId} of its parent`))] : '',
      run.error ? [h('dt', {}, 'Error'), h('dd', { class: 'error' }, run.error)] : '');
    const table = h('table', { class: 'steps' },
      h('caption', {}, 'Steps'),
      h('thead', {}, h('tr', {}, ['Step', 'Status', 'Agent · action', 'Attempts', 'Queue wait', 'Duration', 'Error'].map((c) => h('th', { scope: 'col' }, c)))),
      h('tbody', {}, run.steps.map((st) => {
        const rep = byId.get(st.stepId) || {};
        return h('tr', { 'data-step': st.stepId, 'data-status': st.status, class: st.stepId === selected ? 'selected' : '' },
          h('th', { scope: 'row' }, h('button', { type: 'button', class: 'link', onclick: () => select(st.stepId) }, st.stepId)),
          h('td', {}, badge(st.status), st.held ? h('small', {}, ` ${st.held}`) : '', st.waitingForWorker ? h('small', {}, ' waiting for a worker') : ''),
          h('td', {}, st.workflow ? `workflow ${st.workflow}` : `${st.agent} · ${st.action}`),
          h('td', { class: 'num' }, st.attempts),
          h('td', { class: 'num' }, duration(rep.queueWaitMs)),
          h('td', { class: 'num' }, st.startTime ? duration(st.endTime ? rep.runMs : since(st.startTime)) : '—'),
          h('td', { class: 'error' }, st.error || ''));
      })));
    root.replaceChildren(
      h('p', { class: 'crumbs' }, h('a', { href: '#/runs' }, '← Runs')),
      h('h2', {}, run.name, ' ', badge(run.status)),
      facts, actions,
      h('section', { 'aria-labelledby': 'graph-title' }, h('h3', { id: 'graph-title' }, 'Graph'), graph(run, report, selected, select)),
      table,
      selected ? stepDetail(run, byId, selected) : '');
  }

  function select(stepId) {
    selected = stepId;
    render();
    const detail = $('step-detail');
    if (detail) detail.focus();
  }

  function stepDetail(run, byId, stepId) {
    const st = run.steps.find((x) => x.stepId === stepId);
    if (!st) return '';
    const rep = byId.get(stepId) || { attempts: [] };
    const stepPath = `${runPath}/steps/${encodeURIComponent(stepId)}`;
    return h('section', { id: 'step-detail', class: 'card', tabindex: '-1', 'aria-labelledby': 'step-title' },
      h('h3', { id: 'step-title' }, `Step ${stepId} `, badge(st.status)),
      h('div', { class: 'actions', role: 'group', 'aria-label': 'Step actions' },
        h('button', { type: 'button', disabled: !['failure', 'needs_attention'].includes(st.status), onclick: () => act(`${runPath}/retry`, `Retried ${stepId}`, null, { step: stepId }) }, 'Retry step'),
        h('button', { type: 'button', disabled: !['pending', 'running', 'needs_attention', 'failure'].includes(st.status), onclick: () => act(`${stepPath}/skip`, `Skipped ${stepId}`, `Skip step ${stepId}? Its dependents go on.`) }, 'Skip step'),
        h('button', { type: 'button', class: 'quiet', onclick: () => { selected = null; render(); } }, 'Close')),
      h('table', {},
        h('caption', {}, 'Attempts'),
        h('thead', {}, h('tr', {}, ['#', 'Status', 'Worker', 'Dispatched', 'Queue wait', 'Duration', 'Error'].map((c) => h('th', { scope: 'col' }, c)))),
        h('tbody', {}, rep.attempts.length ? rep.attempts.map((a) => h('tr', {},
          h('td', { class: 'num' }, a.attempt),
          h('td', {}, a.status),
          h('td', { class: 'mono' }, a.worker || '—'),
          h('td', {}, when(a.dispatchedAt)),
          h('td', { class: 'num' }, a.startedAt ? duration(since(a.dispatchedAt, a.startedAt)) : '—'),
          h('td', { class: 'num' }, a.startedAt ? duration(since(a.startedAt, a.finishedAt)) : '—'),
          h('td', { class: 'error' }, a.error || ''))) : h('tr', {}, h('td', { colspan: 7, class: 'empty' }, 'No attempt yet.')))),
      st.error ? [h('h4', {}, 'Error'), h('pre', { class: 'error' }, st.error)] : '',
      st.output !== undefined ? [h('h4', {}, 'Output'), h('pre', {}, JSON.stringify(st.output, null, 2))] : '',
      st.childWorkflowId ? h('p', {}, h('a', { href: `#/runs/${st.childWorkflowId}` }, 'Its sub-workflow run →')) : '');
  }

  return {
    load,
    changed: (runs) => { if (runs === null || runs.has(id)) load().catch(failed); },
  };
}

// The plan's steps left to right by layer (a step's layer is one past its deepest dependency),
// each coloured by its state; instances of a for_each step are counted on their step.
function graph(run, report, selected, select) {
  const instance = /^(.*)\[(\d+)\]$/;
  const status = new Map(run.steps.map((st) => [st.stepId, st]));
  const nodes = report.steps.filter((st) => { const m = instance.exec(st.stepId); return !(m && status.has(m[1])); });
  const ids = new Set(nodes.map((n) => n.stepId));
  const layer = new Map();
  const depth = (node, seen = new Set()) => {
    if (layer.has(node.stepId)) return layer.get(node.stepId);
    if (seen.has(node.stepId)) return 0;
    seen.add(node.stepId);
    const deps = (node.dependsOn || []).filter((d) => ids.has(d));
    const d = deps.length ? 1 + Math.max(...deps.map((id) => depth(nodes.find((n) => n.stepId === id), seen))) : 0;
    layer.set(node.stepId, d);
    return d;
  };
  nodes.forEach((n) => depth(n));
  const layers = [];
  for (const n of nodes) (layers[layer.get(n.stepId)] ||= []).push(n);
  // Order each layer by where its dependencies sit, so that edges cross less.
  const row = new Map();
  layers.forEach((members) => {
    const key = (n) => {
      const deps = (n.dependsOn || []).filter((d) => row.has(d));
      return deps.length ? deps.reduce((a, d) => a + row.get(d), 0) / deps.length : 0;
    };
    members.sort((a, b) => key(a) - key(b));
    members.forEach((n, i) => row.set(n.stepId, i));
  });
  const W = 170; const H = 52; const GX = 70; const GY = 18; const PAD = 12;
  const tallest = Math.max(1, ...layers.map((l) => l.length));
  const width = PAD * 2 + layers.length * W + (layers.length - 1) * GX;
  const height = PAD * 2 + tallest * H + (tallest - 1) * GY;
  const pos = new Map();
  layers.forEach((members, x) => members.forEach((n, y) => {
    const offset = ((tallest - members.length) * (H + GY)) / 2;
    pos.set(n.stepId, { x: PAD + x * (W + GX), y: PAD + offset + y * (H + GY) });
  }));
  const edges = [];
  for (const n of nodes) {
    for (const d of n.dependsOn || []) {
      const from = pos.get(d); const to = pos.get(n.stepId);
      if (!from || !to) continue;
      const x1 = from.x + W; const y1 = from.y + H / 2; const x2 = to.x; const y2 = to.y + H / 2;
      const mid = (x1 + x2) / 2;
      edges.push(s('path', { class: 'edge', d: `M${x1},${y1} C${mid},${y1} ${mid},${y2} ${x2 - 6},${y2}`, 'marker-end': 'url(#arrow)' }));
    }
  }
  const boxes = nodes.map((n) => {
    const st = status.get(n.stepId) || { status: n.status, attempts: 0 };
    const p = pos.get(n.stepId);
    const counts = Object.entries(n.instances || {}).map(([k, v]) => `${v} ${k}`).join(', ');
    const label = `${n.stepId}: ${st.status.replace('_', ' ')}, ${st.attempts} attempt${st.attempts === 1 ? '' : 's'}${counts ? `, instances ${counts}` : ''}`;
    const g = s('g', {
      class: `node st-${st.status}${n.stepId === selected ? ' selected' : ''}`,
      'data-step': n.stepId, 'data-status': st.status,
      transform: `translate(${p.x},${p.y})`, tabindex: '0', role: 'button', 'aria-label': label,
    },
    s('title', {}, label),
    s('rect', { width: W, height: H, rx: 8 }),
    s('text', { x: 10, y: 21, class: 'name' }, n.stepId.length > 22 ? `${n.stepId.slice(0, 21)}…` : n.stepId),
    s('text', { x: 10, y: 40, class: 'state' }, `${st.status.replace('_', ' ')} · ${counts || `${st.attempts} att.`}`));
    g.addEventListener('click', () => select(n.stepId));
    g.addEventListener('keydown', (e) => { if (e.key === 'Enter' || e.key === ' ') { e.preventDefault(); select(n.stepId); } });
    return g;
  });
  return h('div', { class: 'graph' }, s('svg', {
    width, height, viewBox: `0 0 ${width} ${height}`, role: 'group', 'aria-label': `Graph of ${nodes.length} steps`,
  },
  s('defs', {}, s('marker', { id: 'arrow', viewBox: '0 0 10 10', refX: 4, refY: 5, markerWidth: 8, markerHeight: 8, orient: 'auto-start-reverse' },
    s('path', { d: 'M0,0 L10,5 L0,10 z', class: 'arrow' }))),
  edges, boxes));
}

// -- Agents.

function agentsView(root) {
  const body = h('div');
  root.append(h('h2', {}, 'Agents'), body);
  const load = loader(async () => {
    const [agents, breakers, summary] = await Promise.all([
      api('/api/agents'), api('/api/agents/breakers'), api('/api/metrics/summary?range=15m'),
    ]);
    const breaker = new Map(breakers.breakers.map((b) => [b.agent, b]));
    const rate = new Map(summary.agents.map((a) => [a.agent, a]));
    const names = [...new Set([...agents.agents.map((a) => a.name), ...breaker.keys()])].sort();
    const byName = new Map(agents.agents.map((a) => [a.name, a]));
    body.replaceChildren(
      h('table', { class: 'agents' },
        h('caption', {}, 'Agents (error rate over the last 15 minutes)'),
        h('thead', {}, h('tr', {}, ['Agent', 'Health', 'Workers', 'In flight', 'Queue depth', 'Waiting steps', 'Error rate', 'Breaker'].map((c) => h('th', { scope: 'col' }, c)))),
        h('tbody', {}, names.map((name) => {
          const a = byName.get(name) || { health: 'no_workers', workers: [], waitingSteps: 0 };
          const b = breaker.get(name);
          const r = rate.get(name);
          const capacity = a.workers.reduce((n, w) => n + w.concurrency, 0);
          const busy = a.workers.reduce((n, w) => n + w.inFlight, 0);
          return h('tr', { 'data-agent': name },
            h('th', { scope: 'row' }, name),
            h('td', {}, badge(a.health)),
            h('td', { class: 'num' }, `${a.workers.filter((w) => w.health === 'healthy').length} / ${a.workers.length}`),
            h('td', { class: 'num' }, `${busy} / ${capacity}`),
            h('td', { class: 'num' }, a.queueDepth === undefined ? '—' : a.queueDepth),
            h('td', { class: 'num' }, a.waitingSteps, a.oldestWaitingMs ? h('small', {}, ` (oldest ${duration(a.oldestWaitingMs)})`) : ''),
            h('td', { class: 'num' }, r ? `${((1 - r.successRate) * 100).toFixed(1)} % of ${r.executions}` : '—'),
            h('td', {}, b ? badge(b.state) : '—', b && b.heldSteps ? h('small', {}, ` ${b.heldSteps} held`) : ''));
        }))),
      h('table', { class: 'workers' },
        h('caption', {}, 'Workers'),
        h('thead', {}, h('tr', {}, ['Worker', 'Health', 'Agents', 'In flight', 'Host', 'Last seen', 'SDK'].map((c) => h('th', { scope: 'col' }, c)))),
        h('tbody', {}, agents.agents.flatMap((a) => a.workers.map((w) => ({ ...w, of: a.name })))
          .filter((w, i, all) => all.findIndex((x) => x.workerId === w.workerId) === i)
          .map((w) => h('tr', {},
            h('th', { scope: 'row', class: 'mono' }, w.workerId),
            h('td', {}, badge(w.health)),
            h('td', {}, w.agents.join(', ')),
            h('td', { class: 'num' }, `${w.inFlight} / ${w.concurrency}`),
            h('td', {}, w.host ? `${w.host}${w.pid ? ` (pid ${w.pid})` : ''}` : '—'),
            h('td', {}, when(w.lastSeen)),
            h('td', {}, w.sdk || '—'))))));
  });
  return { load, every: 2000, changed: () => load().catch(failed) };
}

// -- Metrics.

function metricsView(root, params) {
  const range = params.get('range') || '15m';
  const picker = h('select', { id: 'range', onchange: (e) => { location.hash = `#/metrics?range=${e.target.value}`; } },
    ['15m', '1h', '6h', '24h'].map((r) => h('option', { value: r, selected: r === range }, r)));
  const body = h('div');
  root.append(h('h2', {}, 'Metrics'), h('p', {}, h('label', { for: 'range' }, 'Over the last '), picker), body);
  const load = loader(async () => {
    const [summary, agents] = await Promise.all([api(`/api/metrics/summary?range=${range}`), api('/api/agents')]);
    const names = [...new Set([...summary.agents.map((a) => a.agent), ...agents.agents.map((a) => a.name)])].sort();
    const figures = await Promise.all(names.map((n) => api(`/api/agents/${encodeURIComponent(n)}/metrics?range=${range}`)));
    body.replaceChildren(
      h('table', {},
        h('caption', {}, `Attempts that ended over the last ${range}`),
        h('thead', {}, h('tr', {}, ['Agent', 'Executions', 'Errors', 'Error rate', 'p50', 'p95', 'p99'].map((c) => h('th', { scope: 'col' }, c)))),
        h('tbody', {}, figures.map((m) => h('tr', { 'data-agent': m.agent },
          h('th', { scope: 'row' }, m.agent),
          h('td', { class: 'num' }, m.executions),
          h('td', { class: 'num' }, m.errors),
          h('td', { class: 'num' }, m.errorRate === undefined ? '—' : `${(m.errorRate * 100).toFixed(1)} %`),
          h('td', { class: 'num' }, duration(m.p50Ms)),
          h('td', { class: 'num' }, duration(m.p95Ms)),
          h('td', { class: 'num' }, duration(m.p99Ms)))))),
      h('div', { class: 'charts' }, figures.map((m) => h('section', { class: 'card chart' },
        h('h3', {}, m.agent),
        chart(m, 'executions', `Executions per ${duration(m.bucketMs)} (errors in red)`),
        chart(m, 'latency', 'Run time p50 (solid) and p95 (dashed)')))));
  });
  return { load, every: 2000, changed: () => load().catch(failed) };
}

function chart(m, kind, title) {
  const W = 360; const H = 120; const L = 44; const B = 18;
  const n = m.series.length;
  const step = (W - L) / n;
  const values = kind === 'executions'
    ? m.series.map((b) => b.executions)
    : m.series.flatMap((b) => [b.p50Ms || 0, b.p95Ms || 0]);
  const top = Math.max(1, ...values);
  const y = (v) => H - B - (v / top) * (H - B - 8);
  const parts = [
    s('line', { x1: L, y1: H - B, x2: W, y2: H - B, class: 'axis' }),
    s('text', { x: L - 4, y: 12, class: 'tick', 'text-anchor': 'end' }, kind === 'executions' ? top : duration(top)),
    s('text', { x: L - 4, y: H - B, class: 'tick', 'text-anchor': 'end' }, '0'),
    s('text', { x: L, y: H - 3, class: 'tick' }, new Date(m.since).toLocaleTimeString()),
    s('text', { x: W, y: H - 3, class: 'tick', 'text-anchor': 'end' }, 'now'),
  ];
  if (kind === 'executions') {
    m.series.forEach((b, i) => {
      const x = L + i * step + 1;
      if (b.executions) parts.push(s('rect', { x, y: y(b.executions), width: step - 2, height: H - B - y(b.executions), class: 'bar' }));
      if (b.errors) parts.push(s('rect', { x, y: y(b.errors), width: step - 2, height: H - B - y(b.errors), class: 'bar err' }));
    });
  } else {
    for (const [key, cls] of [['p50Ms', 'p50'], ['p95Ms', 'p95']]) {
      const points = m.series.map((b, i) => (b[key] === undefined ? null : `${L + (i + 0.5) * step},${y(b[key])}`)).filter(Boolean);
      if (points.length) parts.push(s('polyline', { points: points.join(' '), class: `line ${cls}` }));
    }
  }
  const total = kind === 'executions'
    ? `${m.executions} executions, ${m.errors} errors`
    : `p50 ${duration(m.p50Ms)}, p95 ${duration(m.p95Ms)}`;
  return h('figure', {},
    s('svg', { viewBox: `0 0 ${W} ${H}`, role: 'img', 'aria-label': `${m.agent}: ${title}; ${total}` }, parts),
    h('figcaption', {}, `${title}: ${total}`));
}

// -- Failures.

function failuresView(root) {
  const body = h('tbody');
  root.append(h('h2', {}, 'Latest failures'),
    h('table', {},
      h('caption', { class: 'sr-only' }, 'Failed runs, newest first, with their failed steps'),
      h('thead', {}, h('tr', {}, ['Ended', 'Definition', 'Run', 'Step', 'Error'].map((c) => h('th', { scope: 'col' }, c)))),
      body));
  const load = loader(async () => {
    const page = await api('/api/workflows?status=failure&limit=20');
    const runs = await Promise.all(page.workflows.map((r) => api(`/api/workflows/${r.workflowId}`)));
    const rows = runs.flatMap((run) => {
      const failures = run.steps.filter((st) => st.status === 'failure');
      const lines = failures.length ? failures : [{ stepId: '—', error: run.error || 'failed' }];
      return lines.map((st) => h('tr', { 'data-run': run.workflowId },
        h('td', {}, when(st.endTime || run.endTime)),
        h('td', {}, run.name),
        h('td', {}, h('a', { href: `#/runs/${run.workflowId}`, class: 'mono' }, run.workflowId.slice(0, 8))),
        h('td', {}, st.stepId),
        h('td', { class: 'error' }, st.error || '')));
    });
    body.replaceChildren(...(rows.length ? rows : [h('tr', {}, h('td', { colspan: 5, class: 'empty' }, 'No failed run.'))]));
  });
  return { load, every: 2000, changed: () => load().catch(failed) };
}

// ---- Signing in and out.

function signOut(message) {
  sessionStorage.removeItem(TOKEN_KEY);
  live.generation += 1;
  if (live.abort) live.abort.abort();
  $('nav').hidden = true;
  $('sign-out').hidden = true;
  $('live').textContent = '';
  $('view').replaceChildren();
  $('sign-in').hidden = false;
  $('sign-in-error').textContent = message || '';
  $('token').focus();
}

function start() {
  $('sign-in').hidden = true;
  $('nav').hidden = false;
  $('sign-out').hidden = false;
  setLive(false);
  listen();
  route();
}

document.addEventListener('DOMContentLoaded', () => {
  $('trace-viewer').value = localStorage.getItem(TRACE_KEY) || '';
  $('sign-in').addEventListener('submit', async (e) => {
    e.preventDefault();
    const token = $('token').value.trim();
    sessionStorage.setItem(TOKEN_KEY, token);
    const trace = $('trace-viewer').value.trim();
    if (trace) localStorage.setItem(TRACE_KEY, trace); else localStorage.removeItem(TRACE_KEY);
    try {
      await api('/api/workflows?limit=1');
      $('token').value = '';
      start();
    } catch (error) {
      sessionStorage.removeItem(TOKEN_KEY);
      $('sign-in-error').textContent = error instanceof Unauthorized ? 'This token is not valid.' : error.message;
    }
  });
  $('sign-out').addEventListener('click', () => signOut());
  window.addEventListener('hashchange', () => {
    if (!sessionStorage.getItem(TOKEN_KEY)) return;
    route();
    // Keyboard and screen-reader users land on the new view, not on the link they left.
    $('main').focus({ preventScroll: true });
  });
  if (sessionStorage.getItem(TOKEN_KEY)) start(); else signOut();
});
