import { test } from 'node:test';
import assert from 'node:assert/strict';
import { LogForwarding } from '../../src/links/vhost-user/passthrough-log';
import { ProtocolFeature, VHOST_F_LOG_ALL, VHOST_VRING_F_LOG } from '../../src/vhost-user/protocol';
import { warmLoop } from '../../src/vhost-user/warm-loop';
import { bit, F_VERSION_1 } from '../../src/virtio/constants';

const SHMFD = 1n << BigInt(ProtocolFeature.LOG_SHMFD);
const ADDR = { index: 0, flags: 0, descUserAddr: 0n, usedUserAddr: 0n, availUserAddr: 0n, logGuestAddr: 0n };

test('LogForwarding: whether the back-end can log needs both LOG_ALL and LOG_SHMFD; switches, bases and logged rings are counted across sessions', () => {
  const l = new LogForwarding();
  assert.equal(l.stats().backendLogs, null);
  l.backendOffer(bit(F_VERSION_1) | bit(VHOST_F_LOG_ALL), null);
  assert.equal(l.stats().backendLogs, null, 'protocol features not asked yet');
  l.backendOffer(bit(F_VERSION_1) | bit(VHOST_F_LOG_ALL), 0n);
  assert.equal(l.stats().backendLogs, false, 'LOG_ALL without LOG_SHMFD');
  l.backendOffer(bit(F_VERSION_1), SHMFD);
  assert.equal(l.stats().backendLogs, false, 'LOG_SHMFD without LOG_ALL');
  assert.equal(l.stats().softwareLogging, true, 'a back-end without LOG_ALL: the software relay logs');
  l.backendOffer(bit(F_VERSION_1) | bit(VHOST_F_LOG_ALL), SHMFD);
  assert.equal(l.stats().backendLogs, true);

  l.features(bit(F_VERSION_1));
  l.ringsRunning(1);
  l.logBase();
  l.features(bit(F_VERSION_1) | bit(VHOST_F_LOG_ALL));
  l.features(bit(F_VERSION_1) | bit(VHOST_F_LOG_ALL)); // the same set again is no switch
  l.vringAddr(ADDR);
  l.vringAddr({ ...ADDR, flags: 1 << VHOST_VRING_F_LOG });
  assert.deepEqual(l.stats(), { mode: 'direct', logging: true, backendLogs: true, logBases: 1, logSwitches: 1, logRingAddrs: 1, softwareLogging: false, relaySwitches: 0, relayed: 0, pagesLogged: 0 });
  assert.equal(warmLoop.running, true, 'the loop ticks while a migration logs and a ring runs');
  l.ringsRunning(0);
  assert.equal(warmLoop.running, false, 'the device stop took the last ring: no stop left to warm for');
  assert.equal(l.stats().logging, true, 'logging goes on until LOG_ALL is cleared');
  l.ringsRunning(2);
  assert.equal(warmLoop.running, true, 'rings started again while logging');
  l.stop();
  l.stop();
  assert.equal(warmLoop.running, false);
  assert.deepEqual(l.stats(), { mode: 'direct', logging: false, backendLogs: true, logBases: 1, logSwitches: 2, logRingAddrs: 1, softwareLogging: false, relaySwitches: 0, relayed: 0, pagesLogged: 0 });
  l.features(bit(VHOST_F_LOG_ALL));
  l.ended();
  assert.deepEqual(l.stats(), { mode: 'direct', logging: false, backendLogs: null, logBases: 1, logSwitches: 4, logRingAddrs: 1, softwareLogging: null, relaySwitches: 0, relayed: 0, pagesLogged: 0 });
});

test('LogForwarding with sw-live-migration: the software relay logs whatever the back-end offers; its mode switches and counts add up across relays', () => {
  const l = new LogForwarding(true);
  assert.equal(l.stats().softwareLogging, null, 'not asked yet');
  l.backendOffer(bit(F_VERSION_1) | bit(VHOST_F_LOG_ALL), SHMFD);
  assert.equal(l.stats().softwareLogging, true);
  let live = { relayed: 5, pagesLogged: 7 };
  l.relayAttached(() => live);
  l.relayMode('sw-relay');
  l.relayMode('sw-relay');
  assert.deepEqual([l.stats().mode, l.stats().relaySwitches, l.stats().relayed, l.stats().pagesLogged], ['sw-relay', 1, 5, 7]);
  live = { relayed: 6, pagesLogged: 9 };
  l.relayDetached(live);
  l.relayMode('direct');
  l.relayAttached(() => ({ relayed: 1, pagesLogged: 1 }));
  assert.deepEqual([l.stats().mode, l.stats().relaySwitches, l.stats().relayed, l.stats().pagesLogged], ['direct', 2, 7, 10]);
});
