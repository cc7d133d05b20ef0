/**
 * The topology file's schema, declared once with zod: the key names, what each
 * accepts, its default and its description. Parsing it yields the normalised
 * specs the bridge runs (paths resolved, sizes in bytes, defaults filled in);
 * docs/topology.md's tables and docs/topology.schema.json are generated from it
 * (src/control/topology-docs.ts). Checks that span several entries (unique names
 * and sockets, a PF's VFs) are topology.ts's, run once this schema passes.
 */
import { BUS_ADDRESS_HINT, formatBusAddress, parseBusAddress } from '../virtio-msg/bus/bus-address';
import * as path from 'node:path';
import { z } from 'zod';
import { parseListenAddress, type ListenAddress } from '../api/listen-address';
import type { SocketAccess } from '../native/socket-guard';
import { parseSize, SIZE_HINT, SIZE_RE } from './size';
import { DEFAULT_BACKEND_GRACE_MS } from '../bridge/shadow-link';
import { parseSocketGroup, parseSocketMode, parseSocketOwner } from './socket-access';
import type { BlkFunction, FileBackend, LinkBackend, NetFunction, SinkBackend, SwitchBackend, SwitchSpec } from './topology';

export const DEFAULT_BAR_SIZE = 64 * 1024 * 1024;
/** The default BAR size as a user writes it; parsed like a written one, the output is DEFAULT_BAR_SIZE. */
const DEFAULT_BAR_SIZE_WRITTEN = '64M';
export const DEFAULT_SLOT_SIZE = 2048;
/** PCIe SR-IOV allows up to 65535 VFs; a bridge process serving more than this many sockets is not a use case. */
export const MAX_TOTAL_VFS = 256;
export const MAC_RE = /^([0-9a-f]{2}:){5}[0-9a-f]{2}$/i;

/** What the docs' tables say of a field where its schema alone cannot ("path", "derived from the name"). */
export interface FieldDoc {
  type?: string;
  default?: string;
}
export const fieldDocs = z.registry<FieldDoc>();

/** The description (for editors and the docs) and the docs' words, on the field's outermost schema, where both look. */
function field<T extends z.ZodType>(schema: T, description: string, words: FieldDoc = {}): T {
  const described = schema.describe(description);
  fieldDocs.add(described as z.ZodType, words);
  return described;
}

const shown = (v: unknown): string => JSON.stringify(v);

/** A mapping that refuses keys it does not declare, naming the ones it takes. */
function strict<S extends z.core.$ZodLooseShape>(shape: S) {
  const allowed = Object.keys(shape).join(', ');
  return z.strictObject(shape, {
    error: (iss) => (iss.code === 'unrecognized_keys' ? `unknown field (allowed: ${allowed})` : undefined),
  });
}

/** Turns the exception of one of the project's own value parsers into an issue on the value. */
function parsedBy<T>(parse: (v: unknown) => T) {
  return (v: unknown, ctx: z.core.$RefinementCtx): T => {
    try {
      return parse(v);
    } catch (e) {
      ctx.issues.push({ code: 'custom', message: (e as Error).message, input: v });
      return z.NEVER;
    }
  };
}

/** The message a parser throws for v (for type errors that the parser explains best). */
function parserSays(parse: (v: unknown) => unknown, v: unknown): string | undefined {
  try {
    parse(v);
    return undefined;
  } catch (e) {
    return (e as Error).message;
  }
}

function text() {
  const error = (iss: { input?: unknown }): string | undefined => (iss.input === undefined ? undefined : `expected a non-empty string, got ${shown(iss.input)}`);
  return z.string({ error }).min(1, { error });
}

function int(min: number, max: number) {
  const error = (iss: { input?: unknown }): string | undefined => (iss.input === undefined ? undefined : `expected an integer in [${min}, ${max}], got ${shown(iss.input)}`);
  return z.int({ error }).min(min, { error }).max(max, { error });
}

function flag() {
  return z.boolean({ error: (iss) => (iss.input === undefined ? undefined : `expected true or false, got ${shown(iss.input)}`) });
}

const isPowerOfTwo = (n: number): boolean => n > 0 && (n & (n - 1)) === 0;

function powerOfTwo(min: number, max: number) {
  return int(min, max).refine(isPowerOfTwo, { error: (iss) => `must be a power of two, got ${shown(iss.input)}` });
}

/** "64M", "1G", "4096" or a number of bytes -> bytes. The pattern is for editors; parseSize decides. */
function size() {
  const error = (iss: { input?: unknown }): string | undefined => (iss.input === undefined ? undefined : `expected ${SIZE_HINT}, got ${shown(iss.input)}`);
  return z
    .union([z.int({ error }).positive({ error }), z.string({ error }).meta({ pattern: SIZE_RE.source })], { error })
    .transform(parsedBy((v) => parseSize(v) ?? fail(`expected ${SIZE_HINT}, got ${shown(v)}`)));
}

/** For parsers that say no with null: throws the message parsedBy turns into an issue. */
function fail(message: string): never {
  throw new Error(message);
}

/** A non-empty path, resolved against the topology's folder. */
function pathIn(baseDir: string) {
  return text().transform((p) => path.resolve(baseDir, p));
}

const NAME_RULE = (n: number): string => `use 1-${n} letters, digits, "_", "." or "-"`;

function name(max: number) {
  return text().regex(new RegExp(`^[A-Za-z0-9_.-]{1,${max}}$`), { error: NAME_RULE(max) });
}

/** A user or group, by name or number; the parser looks names up and words every refusal. */
function userOrGroup(parse: (v: unknown) => number) {
  const error = (iss: { input?: unknown }): string | undefined => (iss.input === undefined ? undefined : parserSays(parse, iss.input));
  return z
    .union([z.int({ error }).min(0, { error }), z.string({ error }).min(1, { error })], { error })
    .transform(parsedBy(parse))
    .optional();
}

const socketAccessShape = {
  'socket-mode': field(
    z.string({ error: (iss) => (iss.input === undefined ? undefined : parserSays(parseSocketMode, iss.input)) }).transform(parsedBy(parseSocketMode)).optional(),
    'who may connect to `socket` (connecting needs write permission): for a QEMU that runs as another user, such as libvirt\'s. An unquoted `0660` is refused: YAML reads it as decimal',
    { type: 'quoted octal string, e.g. `"0660"`', default: 'the umask\'s' },
  ),
  'socket-owner': field(userOrGroup(parseSocketOwner), 'owner of `socket` (changing it needs root)', { type: 'user name or uid', default: 'the bridge\'s' }),
  'socket-group': field(userOrGroup(parseSocketGroup), 'group of `socket`, e.g. `kvm` or `libvirt-qemu`', { type: 'group name or gid', default: 'the bridge\'s' }),
};

type AccessKeys = { 'socket-mode'?: number; 'socket-owner'?: number; 'socket-group'?: number };

/** The access the three keys of one mapping ask for; undefined when none is set. */
export function accessOf(o: AccessKeys): SocketAccess | undefined {
  const a: SocketAccess = {};
  if (o['socket-mode'] !== undefined) a.mode = o['socket-mode'];
  if (o['socket-owner'] !== undefined) a.uid = o['socket-owner'];
  if (o['socket-group'] !== undefined) a.gid = o['socket-group'];
  return Object.keys(a).length === 0 ? undefined : a;
}

/** `link` absent or `local`: the device runs in the bridge. */
const localLink = field(z.literal('local').optional(), 'in the bridge');

/** The backends in other processes, which net and blk functions share. */
export function linkBackends(baseDir: string) {
  const barSize = field(
    size()
      .refine((n) => n % 4096 === 0 && n <= 2 ** 31, { error: (iss) => `must be a multiple of 4096 up to 2G, got ${shown(iss.input)}` })
      .prefault(DEFAULT_BAR_SIZE_WRITTEN),
    'BAR2 size (shadow rings and buffer pool), a multiple of 4096, split evenly between the queues',
  );
  const slotSize = field(
    size()
      .refine((n) => isPowerOfTwo(n) && n >= 256 && n <= 1 << 20, { error: (iss) => `must be a power of two in [256, 1M], got ${shown(iss.input)}` })
      .prefault(DEFAULT_SLOT_SIZE),
    'buffer-pool slot (power of two, 256 B-1 MiB); a chain takes contiguous slots',
  );
  const graceMs = field(
    int(0, 3_600_000).default(DEFAULT_BACKEND_GRACE_MS),
    'relay mode: how long (ms) the guest\'s requests wait for a backend that went away (killed, crashed, unplugged) to come back. One that comes back within it gets them again and nothing is lost; after it the function fails (`vbridge stats` says why): blk requests, held and new, complete with an I/O error and net frames the guest sends are dropped and counted, until a backend attaches again and is used as before',
    { default: String(DEFAULT_BACKEND_GRACE_MS) },
  );
  const pcie = field(
    strict({
      link: z.literal('pcie'),
      attach: field(
        pathIn(baseDir),
        'Unix socket where the backend plugs in (the protocol: [pcie-link.md](pcie-link.md)). The function\'s own `socket` appears once a backend has attached and described its device: the guest\'s driver negotiates the backend\'s features and reads its config',
        { default: 'required for `pcie`' },
      ),
      mode: field(
        z.literal('relay', { error: 'the PCIe link always relays (the backend never maps guest memory)' }).optional(),
        '`relay` only: the backend never maps guest memory',
      ),
      'bar-size': barSize,
      'slot-size': slotSize,
      'grace-ms': graceMs,
    }).transform((b): LinkBackend => ({ kind: 'pcie', attach: b.attach, barSize: b['bar-size'], slotSize: b['slot-size'], graceMs: b['grace-ms'] })),
    'in a backend process that attaches over the PCIe link (`vbridge backend blk|net --attach PATH ...`); relay mode only',
  );
  const vhostUser = field(
    strict({
      link: z.literal('vhost-user'),
      socket: field(pathIn(baseDir), 'the back-end\'s socket; the bridge dials it, and dials again every 0.5 s after it went away', { default: 'required for `vhost-user`' }),
      mode: field(
        z.enum(['relay', 'passthrough'], { error: (iss) => `expected "relay" or "passthrough", got ${shown(iss.input)}` }).default('relay'),
        '`relay`: every chain is copied (DMA) between guest memory and the function\'s BAR, where the backend works on shadow rings; the backend never maps guest memory. `passthrough` (vhost-user only, vDPA-style): the back-end gets the guest\'s memory table and rings; the bridge relays only the control messages and the notifications',
      ),
      'sw-live-migration': field(
        flag().optional(),
        'passthrough only: while QEMU logs dirty pages for a live migration, the bridge takes the data path over as DPDK IFCVF\'s sw-live-migration does: the back-end keeps reading the guest\'s rings but writes its used elements to a mediated ring that the bridge copies to the guest, logging every page the back-end wrote and the used ring; the function goes back to direct when logging stops (migration cancelled). The back-end\'s own logging is not used. Always on with a back-end that offers no LOG_ALL. Split rings only: the function then offers no packed rings',
        { default: 'false' },
      ),
      'bar-size': barSize,
      'slot-size': slotSize,
      'grace-ms': graceMs,
    })
      .superRefine((b, ctx) => {
        if (b['sw-live-migration'] !== undefined && b.mode !== 'passthrough') {
          ctx.addIssue({ code: 'custom', path: ['sw-live-migration'], message: 'only a passthrough function (mode: passthrough) has a software relay to switch to' });
        }
      })
      .transform(
        (b): LinkBackend => ({
          kind: 'vhost-user',
          socket: b.socket,
          mode: b.mode,
          swLiveMigration: b['sw-live-migration'] ?? false,
          barSize: b['bar-size'],
          slotSize: b['slot-size'],
          graceMs: b['grace-ms'],
        }),
      ),
    'in an existing vhost-user back-end (qemu-storage-daemon, DPDK\'s vhost PMD, another vbridge) that the bridge drives as front-end',
  );
  const virtioMsg = field(
    strict({
      link: z.literal('virtio-msg'),
      bus: field(
        text()
          .refine((b) => parseBusAddress(b) !== null, {
            error: (iss) => `expected ${BUS_ADDRESS_HINT} (a virtio-msg bus), got ${shown(iss.input)}`,
          })
          .transform((b) => {
            const a = parseBusAddress(b)!;
            return formatBusAddress({ kind: a.kind, path: path.resolve(baseDir, a.path) });
          }),
        'the virtio-msg bus: `socket:PATH` (messages on the stream), `shm:PATH` (shared-memory rings with eventfd doorbells) or `ivshmem:PATH` (the same rings behind ivshmem-style doorbell registers); PATH is the Unix socket a device side (`vbridge backend blk|net --bus KIND:PATH`) listens at; the bridge dials it, and dials again every 0.5 s after it went away. The protocol: [virtio-msg.md](virtio-msg.md)',
        { default: 'required for `virtio-msg`' },
      ),
      device: field(
        int(1, 0xffff).default(1),
        'the device number on the bus',
        { default: '1' },
      ),
      'bar-size': barSize,
      'slot-size': slotSize,
      'grace-ms': graceMs,
    }).transform(
      (b): LinkBackend => ({
        kind: 'virtio-msg',
        bus: b.bus,
        busPath: parseBusAddress(b.bus)!.path,
        device: b.device,
        barSize: b['bar-size'],
        slotSize: b['slot-size'],
        graceMs: b['grace-ms'],
      }),
    ),
    'in a virtio-msg device on a bus (`vbridge backend blk|net --bus KIND:PATH`); relay mode only: the device sees the function\'s shared segment, never guest memory',
  );
  return { pcie, vhostUser, virtioMsg };
}

/** A net function's device in the bridge: a switch port or a sink. */
export function localNetBackend() {
  return field(
    strict({
      link: localLink,
      switch: field(text().optional(), 'a port on the in-process L2 learning switch of this name. Functions on one switch reach each other; TAP devices listed under `switches[].taps` join it too', { default: 'one of `switch` and `sink`' }),
      sink: field(z.literal(true, { error: 'expected true' }).optional(), '`true`: a null sink that counts and drops every frame (benchmarks)', { default: 'one of `switch` and `sink`' }),
    })
      .superRefine((b, ctx) => {
        if (b.switch !== undefined && b.sink !== undefined) ctx.addIssue({ code: 'custom', message: 'give either "switch" or "sink", not both' });
        else if (b.switch === undefined && b.sink === undefined) ctx.addIssue({ code: 'custom', message: 'a net backend needs "switch: NAME" or "sink: true"' });
      })
      .transform((b): SwitchBackend | SinkBackend => (b.sink === true ? { kind: 'sink' } : { kind: 'switch', switch: b.switch ?? '' })),
    'in the bridge: a switch port or a sink',
  );
}

/** A blk function's device in the bridge, on a raw image. */
export function fileBackend(baseDir: string) {
  const blockSize = (description: string) => field(powerOfTwo(512, 65536).optional(), description, { default: '512' });
  return field(
    strict({
      link: localLink,
      file: field(pathIn(baseDir), 'a raw image'),
      readonly: field(flag().default(false), 'writes, discards and write-zeroes fail with an I/O error in the guest'),
      size: field(
        size()
          .refine((n) => n % 512 === 0, { error: (iss) => `must be a multiple of 512, got ${shown(iss.input)}` })
          .optional(),
        'create the file, or grow it, to this size (bytes, or `K`/`M`/`G` suffix; multiple of 512)',
        { default: 'file\'s size' },
      ),
      'block-size': blockSize('logical block size reported to the guest (power of two)'),
      // The spelling of early versions, still read.
      blockSize: blockSize('the same as `block-size` (older spelling; `block-size` wins)'),
      serial: field(text().max(20, { error: 'at most 20 characters' }).optional(), 'the GET_ID string (at most 20 characters)', { default: 'the function\'s name' }),
    }).transform(
      (b): FileBackend => ({ kind: 'file', file: b.file, readonly: b.readonly, size: b.size, blockSize: b['block-size'] ?? b.blockSize ?? 512, serial: b.serial }),
    ),
    'in the bridge, on a raw image',
  );
}

function netBackend(baseDir: string) {
  const { pcie, vhostUser, virtioMsg } = linkBackends(baseDir);
  return z.discriminatedUnion('link', [localNetBackend(), pcie, vhostUser, virtioMsg]);
}

function blkBackend(baseDir: string) {
  const { pcie, vhostUser, virtioMsg } = linkBackends(baseDir);
  return z.discriminatedUnion('link', [fileBackend(baseDir), pcie, vhostUser, virtioMsg]);
}

const BACKEND_DOC = 'where the device runs and what backs it: see below';

/** The fields of a net function, in the order the docs list them. */
export function netShape(baseDir: string) {
  return {
    name: field(name(32), 'unique name, shown by `vbridge stats`', { type: 'string, 1-32 of `[A-Za-z0-9_.-]`' }),
    type: field(z.literal('net'), 'the virtio device', { type: '`net` or `blk`' }),
    socket: field(pathIn(baseDir), 'the vhost-user socket the bridge listens on (QEMU `-chardev socket,path=...`, DPDK `--vdev net_virtio_user0,path=...`)', { type: 'path' }),
    queues: field(int(1, 16).default(1), 'net: queue pairs; blk: request queues', { type: '1-16' }),
    'queue-size': field(powerOfTwo(1, 32768).default(1024), 'largest ring the function accepts', { type: 'power of two, 1-32768' }),
    mac: field(
      z.string({ error: (iss) => (iss.input === undefined ? undefined : `expected xx:xx:xx:xx:xx:xx, got ${shown(iss.input)}`) })
        .regex(MAC_RE, { error: (iss) => `expected xx:xx:xx:xx:xx:xx, got ${shown(iss.input)}` })
        .optional(),
      'net only: MAC in the config space',
      { type: '`xx:xx:xx:xx:xx:xx`', default: 'derived from the name' },
    ),
    mtu: field(int(68, 65535).optional(), 'net only', { type: '68-65535' }),
    offloads: field(
      flag().default(true),
      'net only: offer checksum, TSO (IPv4/IPv6) and ECN offloads both ways (virtio-net CSUM, GUEST_CSUM, HOST_/GUEST_TSO4/6, HOST_/GUEST_ECN)',
      { type: 'boolean' },
    ),
    backend: field(netBackend(baseDir), BACKEND_DOC, { type: 'mapping' }),
    ...socketAccessShape,
  };
}

/** A blk function: the net fields that do not apply are there to be refused by name. */
function blkShape(baseDir: string) {
  const net = netShape(baseDir);
  const netOnly = (what: string) => field(z.never({ error: `only net functions have ${what}` }).optional(), `net only: a blk function has no ${what.replace(/^an? /, '')}`);
  return {
    name: net.name,
    type: field(z.literal('blk'), 'the virtio device'),
    socket: net.socket,
    queues: net.queues,
    'queue-size': net['queue-size'],
    mac: netOnly('a MAC'),
    mtu: netOnly('an MTU'),
    offloads: netOnly('offloads'),
    backend: field(blkBackend(baseDir), BACKEND_DOC),
    ...socketAccessShape,
  };
}

/** A function's spec, and the socket access its own keys ask for (the topology merges it over the top level's). */
export interface ParsedFunction<F> {
  spec: F;
  access: SocketAccess | undefined;
}

function netFunction(baseDir: string) {
  return strict(netShape(baseDir)).transform((f): ParsedFunction<NetFunction> => ({
    spec: { name: f.name, type: f.type, socket: f.socket, queues: f.queues, queueSize: f['queue-size'], mac: f.mac, mtu: f.mtu, offloads: f.offloads, backend: f.backend },
    access: accessOf(f),
  }));
}

function blkFunction(baseDir: string) {
  return strict(blkShape(baseDir)).transform((f): ParsedFunction<BlkFunction> => ({
    spec: { name: f.name, type: f.type, socket: f.socket, queues: f.queues, queueSize: f['queue-size'], backend: f.backend },
    access: accessOf(f),
  }));
}

/** One function, told apart by its `type`. */
export function functionSchema(baseDir: string) {
  return z.discriminatedUnion('type', [netFunction(baseDir), blkFunction(baseDir)]);
}

/** A PF's own keys; the rest of a PF is its VF template. */
export function pfHead(type: 'net' | 'blk') {
  return {
    name: field(name(24), 'VF n is named `NAME/vfN`', { type: 'string, 1-24 of `[A-Za-z0-9_.-]`' }),
    type: field(z.literal(type), 'the virtio device of the VFs', { type: '`blk` or `net`' }),
    'total-vfs': field(int(1, MAX_TOTAL_VFS), 'the limit (sriov_totalvfs); `num-vfs` above it is refused', { type: `1-${MAX_TOTAL_VFS}` }),
    'num-vfs': field(int(0, MAX_TOTAL_VFS).default(0), 'VFs at first start (a saved state wins)', { type: '0..`total-vfs`' }),
  };
}

/**
 * A PF: its own keys and the VF template, the fields of a function. The template is
 * checked here as written; topology.ts also builds its last VF, {vf} expanded.
 */
function pfSchema(baseDir: string) {
  const tooMany = (p: { 'total-vfs': number; 'num-vfs': number }, ctx: z.core.$RefinementCtx): void => {
    if (p['num-vfs'] > p['total-vfs']) ctx.addIssue({ code: 'custom', path: ['num-vfs'], message: `${p['num-vfs']} is above total-vfs (${p['total-vfs']})` });
  };
  return z.discriminatedUnion('type', [strict({ ...netShape(baseDir), ...pfHead('net') }).superRefine(tooMany), strict({ ...blkShape(baseDir), ...pfHead('blk') }).superRefine(tooMany)]);
}

const IFNAME_RE = /^[A-Za-z0-9_.-]{1,15}$/;

export function switchSchema() {
  const error = 'expected a network interface name (at most 15 characters)';
  return strict({
    name: field(text(), 'switch name'),
    tap: field(text().optional(), 'a host TAP device to create/attach (needs root)'),
    taps: field(z.array(z.string({ error }).regex(IFNAME_RE, { error }), { error: 'expected a list of TAP device names' }).optional(), 'host TAP device names to create/attach (needs root)'),
  }).transform((s): SwitchSpec => ({ name: s.name, taps: [...(s.tap !== undefined ? [s.tap] : []), ...(s.taps ?? [])] }));
}

/** The whole file. Defaults that depend on other keys (control, http-token) and checks across entries are topology.ts's. */
export function topologySchema(baseDir: string) {
  return strict({
    control: field(pathIn(baseDir).optional(), 'HTTP control socket used by `vbridge stats`', { default: 'per topology file (see below)' }),
    ...socketAccessShape,
    http: field(
      z.union([text(), z.int()], { error: (iss) => (iss.input === undefined ? undefined : `expected ADDR:PORT, a port or a Unix socket path, got ${shown(iss.input)}`) })
        .transform(parsedBy((h): ListenAddress => parseListenAddress(String(h), baseDir)))
        .optional(),
      'HTTP API and /metrics (docs/openapi.yaml): `ADDR:PORT`, `[ADDR]:PORT`, a bare port (loopback), or a Unix socket path',
      { default: 'off' },
    ),
    'http-token': field(pathIn(baseDir).optional(), 'where serve writes the HTTP API\'s bearer token (mode 0600)', { default: 'next to the control socket (control.http-token)' }),
    'state-dir': field(pathIn(baseDir).optional(), 'where the function manager persists run-time state', { default: 'none: changes are lost on restart' }),
    switches: field(z.array(switchSchema(), { error: 'expected a list' }).optional(), 'switches and the TAP devices they join (`switches[]` below); a switch named by a function exists implicitly', { default: 'none' }),
    functions: field(z.array(functionSchema(baseDir), { error: 'expected a non-empty list' }).optional(), 'the functions the bridge serves (`functions[]` below)', { default: 'required unless `pfs` is given' }),
    pfs: field(z.array(pfSchema(baseDir), { error: 'expected a list' }).optional(), 'SR-IOV-style PFs: VF templates and counts (`pfs[]` below)', { default: 'none' }),
  });
}

export type TopologyDocument = z.output<ReturnType<typeof topologySchema>>;
export type FunctionOutput = z.output<ReturnType<typeof functionSchema>>;

