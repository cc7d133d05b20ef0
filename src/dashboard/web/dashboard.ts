/**
 * The dashboard page's script (runs in the browser; compiled by
 * tsconfig.dashboard.json). It follows GET /v1/events, where the bridge sends
 * a snapshot of every collection about once a second, turns successive
 * counters into rates with a short history for the sparklines, and keeps the
 * DOM keyed by name so that an input being typed into survives the updates.
 * Actions POST to the same endpoints as curl would, with the bearer token the
 * user gives once per tab (sessionStorage).
 */

interface Queue {
  index: number;
  name: string;
  descriptors: number;
  bytes: number;
  kicks: number;
  interrupts: number;
  drops: number;
  errors: number;
}
interface Fn {
  name: string;
  type: string;
  link: string;
  connected: boolean;
  needsReset: boolean;
  queues: Queue[];
}
interface ShadowQueue {
  name: string;
  dma: { toBarOps: number; toBarBytes: number; toGuestOps: number; toGuestBytes: number };
}
interface Link {
  function: string;
  kind: string;
  mode: string;
  state: string;
  queues: ShadowQueue[];
}
interface SwitchPort {
  name: string;
  rxFrames: number;
  rxBytes: number;
  txFrames: number;
  txBytes: number;
  drops: number;
}
interface Switch {
  name: string;
  dropped: number;
  learned: number;
  ports: SwitchPort[];
}
interface Pf {
  name: string;
  type: string;
  totalVfs: number;
  numVfs: number;
}
interface Vf {
  name: string;
  pf: string;
  state: string;
  connected: boolean;
  qmp: string | null;
}
interface Snapshot {
  time: number;
  actions: Record<string, string[]>;
  functions?: Fn[];
  links?: Link[];
  switches?: Switch[];
  pfs?: Pf[];
  vfs?: Vf[];
}

const TOKEN_KEY = 'vbridge-token';
const HISTORY = 60;
const FAULT_KINDS = ['link-down', 'link-up', 'dma-error', 'drop-interrupt', 'delay', 'clear'];

// ---- rates -----------------------------------------------------------------

/** One counter's last value and the rates computed from it, newest last. */
interface Series {
  value: number;
  time: number;
  rates: number[];
}

const series = new Map<string, Series>();
let seenThisRound = new Set<string>();

/** The counter's rate per second since the last snapshot (0 on the first; a counter that went back, a re-created VF, counts as 0). */
function rate(key: string, value: number, time: number): Series {
  seenThisRound.add(key);
  const s = series.get(key);
  if (s === undefined) {
    const fresh = { value, time, rates: [0] };
    series.set(key, fresh);
    return fresh;
  }
  if (time > s.time) {
    const r = value >= s.value ? ((value - s.value) * 1000) / (time - s.time) : 0;
    s.rates.push(r);
    if (s.rates.length > HISTORY) s.rates.shift();
    s.value = value;
    s.time = time;
  }
  return s;
}

function last(s: Series): number {
  return s.rates[s.rates.length - 1] ?? 0;
}

/** Adds rates point by point (both directions of a queue on one chart). */
function sumSeries(...all: Series[]): Series {
  const n = Math.max(...all.map((s) => s.rates.length));
  const rates: number[] = [];
  for (let i = 0; i < n; i++) rates.push(all.reduce((acc, s) => acc + (s.rates[s.rates.length - n + i] ?? 0), 0));
  return { value: 0, time: 0, rates };
}

function fmtCount(r: number): string {
  if (r >= 1e6) return `${(r / 1e6).toFixed(1)}M/s`;
  if (r >= 1e4) return `${(r / 1e3).toFixed(1)}k/s`;
  return `${r.toFixed(r < 100 ? 1 : 0)}/s`;
}

function fmtBytes(r: number): string {
  if (r >= 1e9) return `${(r / 1e9).toFixed(2)} GB/s`;
  if (r >= 1e6) return `${(r / 1e6).toFixed(2)} MB/s`;
  if (r >= 1e3) return `${(r / 1e3).toFixed(1)} kB/s`;
  return `${r.toFixed(0)} B/s`;
}

// ---- DOM helpers -------------------------------------------------------------

function el<K extends keyof HTMLElementTagNameMap>(tag: K, attrs: Record<string, string> = {}, text?: string): HTMLElementTagNameMap[K] {
  const e = document.createElement(tag);
  for (const [k, v] of Object.entries(attrs)) e.setAttribute(k, v);
  if (text !== undefined) e.textContent = text;
  return e;
}

function byId<T extends HTMLElement>(id: string): T {
  const e = document.getElementById(id);
  if (e === null) throw new Error(`the page has no #${id}`);
  return e as T;
}

/**
 * Makes container's keyed children match items, in order: existing ones are
 * kept (and updated), new ones created, gone ones removed.
 */
function sync<T>(container: HTMLElement, attr: string, items: T[], key: (t: T) => string, create: (t: T) => HTMLElement, update: (e: HTMLElement, t: T) => void): void {
  const existing = new Map<string, HTMLElement>();
  for (const c of Array.from(container.children)) {
    const k = c.getAttribute(attr);
    if (k !== null) existing.set(k, c as HTMLElement);
    else c.remove();
  }
  let prev: Element | null = null;
  for (const item of items) {
    const k = key(item);
    let e = existing.get(k);
    if (e === undefined) {
      e = create(item);
      e.setAttribute(attr, k);
    }
    existing.delete(k);
    update(e, item);
    const want: ChildNode | null = prev === null ? container.firstChild : prev.nextSibling;
    if (want !== e) container.insertBefore(e, want);
    prev = e;
  }
  for (const e of existing.values()) e.remove();
}

function field(root: HTMLElement, name: string): HTMLElement {
  const e = root.querySelector<HTMLElement>(`[data-field="${name}"]`);
  if (e === null) throw new Error(`no field ${name}`);
  return e;
}

function setText(e: HTMLElement, text: string): void {
  if (e.textContent !== text) e.textContent = text;
}

function badge(e: HTMLElement, text: string, tone: 'good' | 'warn' | 'bad' | '' = ''): void {
  setText(e, text);
  e.className = `badge ${tone}`.trim();
}

const SVG = 'http://www.w3.org/2000/svg';

function sparkline(): SVGSVGElement {
  const svg = document.createElementNS(SVG, 'svg');
  svg.setAttribute('class', 'spark');
  svg.setAttribute('width', '120');
  svg.setAttribute('height', '24');
  svg.setAttribute('viewBox', '0 0 120 24');
  svg.setAttribute('role', 'img');
  svg.appendChild(document.createElementNS(SVG, 'polyline'));
  svg.appendChild(document.createElementNS(SVG, 'title'));
  return svg;
}

/** Draws the history scaled to its own peak; the title tells the newest value for whoever hovers. */
function drawSpark(svg: Element, s: Series, fmt: (r: number) => string): void {
  const rates = s.rates;
  const peak = Math.max(1e-9, ...rates);
  const step = 120 / (HISTORY - 1);
  const x0 = 120 - (rates.length - 1) * step;
  const points = rates.map((r, i) => `${(x0 + i * step).toFixed(1)},${(22 - (r / peak) * 20).toFixed(1)}`).join(' ');
  svg.querySelector('polyline')?.setAttribute('points', points);
  const title = svg.querySelector('title');
  if (title !== null) title.textContent = `now ${fmt(last(s))}, peak ${fmt(peak < 1e-6 ? 0 : peak)}`;
  svg.setAttribute('aria-label', `${fmt(last(s))}`);
}

/** A cell showing a rate; data-rate names the counter so the text can be found. */
function rateCell(row: HTMLElement, name: string, s: Series, fmt: (r: number) => string): void {
  let td = row.querySelector<HTMLElement>(`[data-rate="${name}"]`);
  if (td === null) {
    td = el('td', { 'data-rate': name });
    row.appendChild(td);
  }
  setText(td, fmt(last(s)));
}

function sparkCell(row: HTMLElement, s: Series, fmt: (r: number) => string): void {
  let td = row.querySelector<HTMLElement>('td.chart');
  if (td === null) {
    td = el('td', { class: 'chart' });
    td.appendChild(sparkline());
    row.appendChild(td);
  }
  const svg = td.querySelector('svg');
  if (svg !== null) drawSpark(svg, s, fmt);
}

// ---- messages and the token --------------------------------------------------

function message(text: string, isError: boolean): void {
  const m = byId<HTMLParagraphElement>('message');
  m.textContent = text;
  m.className = isError ? 'error' : '';
  m.hidden = false;
}

/** Shows the token form (with why, after a refusal); resolves with what was entered, or null when cancelled. */
function askToken(why: string | null): Promise<string | null> {
  const form = byId<HTMLFormElement>('token-form');
  const input = byId<HTMLInputElement>('token-input');
  const cancel = byId<HTMLButtonElement>('token-cancel');
  byId('token-error').textContent = why ?? '';
  input.value = '';
  form.hidden = false;
  input.focus();
  return new Promise((resolve) => {
    const done = (v: string | null): void => {
      form.removeEventListener('submit', onSubmit);
      cancel.removeEventListener('click', onCancel);
      form.hidden = true;
      resolve(v);
    };
    const onSubmit = (ev: Event): void => {
      ev.preventDefault();
      const v = input.value.trim();
      if (v !== '') done(v);
    };
    const onCancel = (): void => done(null);
    form.addEventListener('submit', onSubmit);
    cancel.addEventListener('click', onCancel);
  });
}

/** POSTs an action with the token, asking for one first if the tab has none, and again after a 401/403. */
async function act(label: string, url: string, body: Record<string, unknown>, button: HTMLButtonElement | null): Promise<void> {
  if (button !== null) {
    button.disabled = true;
    button.dataset.busy = '1';
  }
  try {
    let refusal: string | null = null;
    for (;;) {
      let token = sessionStorage.getItem(TOKEN_KEY);
      if (token === null) {
        token = await askToken(refusal);
        if (token === null) {
          message(`${label}: cancelled (no token)`, true);
          return;
        }
        sessionStorage.setItem(TOKEN_KEY, token);
      }
      const res = await fetch(url, {
        method: 'POST',
        headers: { authorization: `Bearer ${token}`, 'content-type': 'application/json' },
        body: JSON.stringify(body),
      });
      const answer = (await res.json().catch(() => ({}))) as { error?: string };
      if (res.status === 401 || res.status === 403) {
        sessionStorage.removeItem(TOKEN_KEY);
        refusal = `The bridge refused the token (${res.status}${answer.error !== undefined ? `: ${answer.error}` : ''}). Enter it again.`;
        message(`${label}: refused (${res.status})`, true);
        continue;
      }
      if (!res.ok) {
        message(`${label}: ${res.status} ${answer.error ?? res.statusText}`, true);
        return;
      }
      message(`${label}: done`, false);
      return;
    }
  } catch (e) {
    message(`${label}: ${e instanceof Error ? e.message : String(e)}`, true);
  } finally {
    if (button !== null) {
      delete button.dataset.busy;
      button.disabled = false;
    }
  }
}

function path(collection: string, id: string, action: string): string {
  return `/v1/${collection}/${encodeURIComponent(id)}/actions/${action}`;
}

function actionButton(label: string, action: string, onClick: (b: HTMLButtonElement) => void): HTMLButtonElement {
  const b = el('button', { type: 'button', 'data-action': action }, label);
  b.addEventListener('click', () => onClick(b));
  return b;
}

// ---- functions -----------------------------------------------------------------

interface FnView {
  fn: Fn;
  link: Link | undefined;
  vf: Vf | undefined;
}

function createFunctionCard(v: FnView, actions: Record<string, string[]>): HTMLElement {
  const card = el('article', { class: 'card' });
  const head = el('div', { class: 'card-head' });
  head.append(el('h3', {}, v.fn.name), el('span', { 'data-field': 'type' }), el('span', { 'data-field': 'link' }), el('span', { 'data-field': 'link-state' }), el('span', { 'data-field': 'state' }));
  card.appendChild(head);
  const table = el('table', { class: 'queues' });
  const hr = el('tr');
  for (const h of ['queue', 'descriptors/s', 'bytes/s', 'kicks/s', 'interrupts/s', 'descriptors/s, last minute']) hr.appendChild(el('th', {}, h));
  table.append(el('thead'), el('tbody'));
  table.tHead?.appendChild(hr);
  card.appendChild(table);
  const summary = el('div', { class: 'summary' });
  summary.append(el('span', { 'data-field': 'notifications' }), el('span', { 'data-field': 'dma' }));
  card.appendChild(summary);
  const dma = el('table', { class: 'dma', hidden: '' });
  const dr = el('tr');
  for (const h of ['shadow queue', 'DMA ops/s', 'DMA bytes/s', 'bytes/s, last minute']) dr.appendChild(el('th', {}, h));
  dma.append(el('thead'), el('tbody'));
  dma.tHead?.appendChild(dr);
  card.appendChild(dma);
  const buttons = el('div', { class: 'actions' });
  const name = v.fn.name;
  if (v.vf !== undefined) {
    const have = actions.vfs ?? [];
    for (const [action, label] of [
      ['pause', 'Pause'],
      ['resume', 'Resume'],
      ['detach', 'Detach'],
    ] as const) {
      if (have.includes(action)) buttons.appendChild(actionButton(label, action, (b) => void act(`${label} ${name}`, path('vfs', name, action), {}, b)));
    }
    if (have.includes('attach')) {
      const qmp = el('input', { type: 'text', placeholder: 'QMP socket of the guest', 'data-input': 'qmp', size: '28' });
      buttons.append(qmp, actionButton('Attach', 'attach', (b) => void act(`Attach ${name}`, path('vfs', name, 'attach'), { qmp: qmp.value }, b)));
    }
  } else {
    const have = actions.functions ?? [];
    // Only a net function has a switch port whose MACs could be forgotten.
    if (have.includes('forget-macs') && v.fn.type === 'net') buttons.appendChild(actionButton('Forget MACs', 'forget-macs', (b) => void act(`Forget MACs of ${name}`, path('functions', name, 'forget-macs'), {}, b)));
    if (have.includes('fault')) {
      const kind = el('select', { 'data-input': 'fault-kind' });
      for (const k of FAULT_KINDS) kind.appendChild(el('option', { value: k }, k));
      const count = el('input', { type: 'number', min: '1', placeholder: 'count', 'data-input': 'fault-count' });
      const ms = el('input', { type: 'number', min: '1', placeholder: 'ms', 'data-input': 'fault-ms' });
      const inject = actionButton('Inject fault', 'fault', (b) => {
        const body: Record<string, unknown> = { kind: kind.value };
        if (count.value !== '') body.count = Number(count.value);
        if (ms.value !== '') body.ms = Number(ms.value);
        void act(`Fault ${kind.value} on ${name}`, path('functions', name, 'fault'), body, b);
      });
      const clear = actionButton('Clear faults', 'fault-clear', (b) => void act(`Clear faults of ${name}`, path('functions', name, 'fault'), { kind: 'clear' }, b));
      buttons.append(kind, count, ms, inject, clear);
    }
  }
  card.appendChild(buttons);
  return card;
}

function updateFunctionCard(card: HTMLElement, v: FnView, time: number): void {
  const { fn, link, vf } = v;
  badge(field(card, 'type'), fn.type);
  badge(field(card, 'link'), link === undefined ? fn.link : link.mode === link.kind ? link.kind : `${link.kind} ${link.mode}`);
  const ls = link?.state ?? 'up';
  badge(field(card, 'link-state'), `link ${ls}`, ls === 'up' ? 'good' : 'bad');
  let state: string;
  if (vf !== undefined) state = vf.state;
  else state = fn.needsReset ? 'needs reset' : fn.connected ? 'connected' : 'no front-end';
  badge(field(card, 'state'), state, state === 'attached' || state === 'connected' ? 'good' : state === 'paused' || state === 'no front-end' || state === 'detached' ? 'warn' : 'bad');
  card.setAttribute('data-state', state);
  if (vf !== undefined) {
    for (const b of Array.from(card.querySelectorAll<HTMLButtonElement>('button[data-action]'))) {
      const a = b.getAttribute('data-action');
      // Enabled when the action applies to the VF's state; a click in flight keeps its own button disabled.
      if (b.dataset.busy === undefined) b.disabled = (a === 'pause' && vf.state !== 'attached') || (a === 'resume' && vf.state !== 'paused') || (a === 'detach' && vf.state === 'detached') || (a === 'attach' && vf.state !== 'detached');
    }
  }

  const key = `fn:${fn.name}`;
  const tbody = card.querySelector<HTMLElement>('table.queues tbody');
  let kicks: Series[] = [];
  let irqs: Series[] = [];
  if (tbody !== null) {
    sync(
      tbody,
      'data-queue',
      fn.queues,
      (q) => q.name,
      (q) => namedRow(q.name),
      (tr, q) => {
        const k = `${key}:${q.name}`;
        const d = rate(`${k}:descriptors`, q.descriptors, time);
        const kk = rate(`${k}:kicks`, q.kicks, time);
        const ii = rate(`${k}:interrupts`, q.interrupts, time);
        rateCell(tr, 'descriptors', d, fmtCount);
        rateCell(tr, 'bytes', rate(`${k}:bytes`, q.bytes, time), fmtBytes);
        rateCell(tr, 'kicks', kk, fmtCount);
        rateCell(tr, 'interrupts', ii, fmtCount);
        sparkCell(tr, d, fmtCount);
        kicks.push(kk);
        irqs.push(ii);
      },
    );
  }
  if (kicks.length === 0) kicks = [{ value: 0, time: 0, rates: [0] }];
  if (irqs.length === 0) irqs = [{ value: 0, time: 0, rates: [0] }];
  setText(field(card, 'notifications'), `kicks ${fmtCount(last(sumSeries(...kicks)))}, interrupts ${fmtCount(last(sumSeries(...irqs)))}`);

  const dmaTable = card.querySelector<HTMLElement>('table.dma');
  const dmaBody = dmaTable?.querySelector<HTMLElement>('tbody') ?? null;
  const shadow = link?.queues ?? [];
  if (dmaTable !== null && dmaBody !== null) {
    dmaTable.hidden = shadow.length === 0;
    const ops: Series[] = [];
    const bytes: Series[] = [];
    sync(
      dmaBody,
      'data-shadow',
      shadow,
      (q) => q.name,
      (q) => namedRow(q.name),
      (tr, q) => {
        const k = `link:${fn.name}:${q.name}`;
        const o = rate(`${k}:ops`, q.dma.toBarOps + q.dma.toGuestOps, time);
        const b = rate(`${k}:bytes`, q.dma.toBarBytes + q.dma.toGuestBytes, time);
        rateCell(tr, 'dma-ops', o, fmtCount);
        rateCell(tr, 'dma-bytes', b, fmtBytes);
        sparkCell(tr, b, fmtBytes);
        ops.push(o);
        bytes.push(b);
      },
    );
    setText(
      field(card, 'dma'),
      shadow.length === 0 ? (link === undefined || link.kind === 'local' ? 'DMA: none (the device runs in the bridge)' : 'DMA: no shadow queues yet') : `DMA ${fmtCount(last(sumSeries(...ops)))}, ${fmtBytes(last(sumSeries(...bytes)))}`,
    );
  }
}

// ---- groups: PFs with their VFs, then the plain functions --------------------------

interface Group {
  key: string;
  pf: Pf | undefined;
  fns: FnView[];
}

function groups(s: Snapshot): Group[] {
  const fns = s.functions ?? [];
  const links = new Map((s.links ?? []).map((l) => [l.function, l]));
  const vfs = new Map((s.vfs ?? []).map((v) => [v.name, v]));
  const view = (fn: Fn): FnView => ({ fn, link: links.get(fn.name), vf: vfs.get(fn.name) });
  const out: Group[] = (s.pfs ?? []).map((pf) => ({ key: `pf:${pf.name}`, pf, fns: fns.filter((f) => vfs.get(f.name)?.pf === pf.name).map(view) }));
  const plain = fns.filter((f) => !vfs.has(f.name));
  if (plain.length > 0) out.push({ key: 'functions', pf: undefined, fns: plain.map(view) });
  return out;
}

function createGroup(g: Group, actions: Record<string, string[]>): HTMLElement {
  const sec = el('section', { class: 'group', 'data-group': g.pf?.name ?? '' });
  const head = el('div', { class: 'group-head' });
  head.appendChild(el('h2', { 'data-field': 'title' }));
  if (g.pf !== undefined && (actions.pfs ?? []).includes('set')) {
    const pf = g.pf.name;
    const n = el('input', { type: 'number', min: '0', 'data-input': 'num-vfs', 'aria-label': `num-vfs of ${pf}` });
    const set = actionButton('Set num-vfs', 'set', (b) => void act(`num-vfs ${n.value} on ${pf}`, path('pfs', pf, 'set'), { 'num-vfs': Number(n.value) }, b));
    head.append(n, set);
  }
  sec.append(head, el('div', { class: 'cards' }));
  return sec;
}

function updateGroup(sec: HTMLElement, g: Group, s: Snapshot): void {
  setText(field(sec, 'title'), g.pf === undefined ? 'Functions' : `PF ${g.pf.name} (${g.pf.type}): ${g.pf.numVfs} of ${g.pf.totalVfs} VFs`);
  const n = sec.querySelector<HTMLInputElement>('input[data-input="num-vfs"]');
  // Not while someone is typing a new value.
  if (n !== null && g.pf !== undefined && document.activeElement !== n) n.value = String(g.pf.numVfs);
  const cards = sec.querySelector<HTMLElement>('.cards');
  if (cards === null) return;
  if (g.fns.length === 0) {
    if (cards.querySelector('p.muted') === null) cards.replaceChildren(el('p', { class: 'muted' }, 'no VFs'));
    return;
  }
  sync(
    cards,
    'data-fn',
    g.fns,
    (v) => v.fn.name,
    (v) => createFunctionCard(v, s.actions),
    (card, v) => updateFunctionCard(card, v, s.time),
  );
}

// ---- switches -----------------------------------------------------------------------

function createSwitch(sw: Switch, actions: Record<string, string[]>): HTMLElement {
  const card = el('article', { class: 'card' });
  const head = el('div', { class: 'card-head' });
  head.append(el('h3', {}, sw.name), el('span', { 'data-field': 'learned', class: 'badge' }), el('span', { 'data-field': 'dropped', class: 'badge' }));
  card.appendChild(head);
  const table = el('table', { class: 'ports' });
  const hr = el('tr');
  for (const h of ['port', 'frames in/s', 'frames out/s', 'bytes in/s', 'bytes out/s', 'drops', 'frames/s, last minute']) hr.appendChild(el('th', {}, h));
  table.append(el('thead'), el('tbody'));
  table.tHead?.appendChild(hr);
  card.appendChild(table);
  if ((actions.switches ?? []).includes('forget-macs')) {
    const buttons = el('div', { class: 'actions' });
    buttons.appendChild(actionButton('Forget MACs', 'forget-macs', (b) => void act(`Forget MACs of ${sw.name}`, path('switches', sw.name, 'forget-macs'), {}, b)));
    card.appendChild(buttons);
  }
  return card;
}

/** A table row that starts with its name's cell; sync() fills in the rest. */
function namedRow(name: string): HTMLElement {
  const tr = el('tr');
  tr.appendChild(el('td', {}, name));
  return tr;
}

function updateSwitch(card: HTMLElement, sw: Switch, time: number): void {
  setText(field(card, 'learned'), `${sw.learned} MACs learned`);
  setText(field(card, 'dropped'), `${sw.dropped} dropped`);
  const tbody = card.querySelector<HTMLElement>('table.ports tbody');
  if (tbody === null) return;
  sync(
    tbody,
    'data-port',
    sw.ports,
    (p) => p.name,
    (p) => namedRow(p.name),
    (tr, p) => {
      const k = `sw:${sw.name}:${p.name}`;
      const rin = rate(`${k}:rxFrames`, p.rxFrames, time);
      const rout = rate(`${k}:txFrames`, p.txFrames, time);
      rateCell(tr, 'rxFrames', rin, fmtCount);
      rateCell(tr, 'txFrames', rout, fmtCount);
      rateCell(tr, 'rxBytes', rate(`${k}:rxBytes`, p.rxBytes, time), fmtBytes);
      rateCell(tr, 'txBytes', rate(`${k}:txBytes`, p.txBytes, time), fmtBytes);
      let drops = tr.querySelector<HTMLElement>('[data-field="drops"]');
      if (drops === null) {
        drops = el('td', { 'data-field': 'drops' });
        tr.appendChild(drops);
      }
      setText(drops, String(p.drops));
      sparkCell(tr, sumSeries(rin, rout), fmtCount);
    },
  );
}

// ---- the stream ---------------------------------------------------------------------

function render(s: Snapshot): void {
  seenThisRound = new Set();
  const gs = groups(s);
  const groupsEl = byId('groups');
  if (gs.length === 0) groupsEl.replaceChildren(el('p', { class: 'muted' }, 'no functions'));
  else
    sync(
      groupsEl,
      'data-group-key',
      gs,
      (g) => g.key,
      (g) => createGroup(g, s.actions),
      (sec, g) => updateGroup(sec, g, s),
    );
  const sws = s.switches ?? [];
  const swEl = byId('switches');
  if (sws.length === 0) swEl.replaceChildren(el('p', { class: 'muted' }, 'none'));
  else
    sync(
      swEl,
      'data-switch',
      sws,
      (sw) => sw.name,
      (sw) => createSwitch(sw, s.actions),
      (card, sw) => updateSwitch(card, sw, s.time),
    );
  // Counters of things that went away (a VF removed) would otherwise be kept forever.
  for (const k of Array.from(series.keys())) if (!seenThisRound.has(k)) series.delete(k);
  setText(byId('updated'), `updated ${new Date(s.time).toLocaleTimeString()}`);
}

function follow(): void {
  const conn = byId('conn');
  const events = new EventSource('/v1/events');
  events.addEventListener('open', () => {
    conn.textContent = 'live';
    conn.className = 'conn live';
  });
  events.addEventListener('error', () => {
    // EventSource reconnects by itself (the server asks for 2 s).
    conn.textContent = 'reconnecting…';
    conn.className = 'conn down';
  });
  events.addEventListener('snapshot', (ev) => {
    try {
      render(JSON.parse((ev as MessageEvent<string>).data) as Snapshot);
    } catch (e) {
      message(`cannot show the snapshot: ${e instanceof Error ? e.message : String(e)}`, true);
    }
  });
}

follow();
