// Preloaded with `node --require` by tests/support/poa_chain.py. Three fixes for @ethereumjs/client 0.9.0:
//
// 1. --unlock <keyfile> crashes before reading the file: cli.js calls readline_1.default.createInterface
//    on a plain require('readline'), which has no .default. Giving the cached module a .default fixes it.
//
// 2. It hard-codes listen('0.0.0.0') for RLPx (TCP) and discovery (UDP) and
// can dial peers and a public DNS resolver. Tests may only touch loopback, so this rewrites every
// wildcard bind to 127.0.0.1 and refuses any outbound TCP/UDP to a non-loopback address.
//
// 3. Seal gate: with CROWDFL_SEAL_GATE=<file> set, the miner does not seal while <file> is absent
//    (it re-checks every 100 ms). The miner starts sealing at start-up whether or not it has a peer,
//    so two signers started side by side can both seal block 1 before they peer, fork at genesis and
//    then wait on each other for ever ("too recently signed"). The harness peers the nodes first,
//    then opens one gate, waits until the other node has block 1, then opens the other.
//
// 4. Sync nudge (always on): a lost block announcement stalled a two-sealer network for good. 0.9.0
//    learns of a peer's blocks only from NewBlock/NewBlockHashes messages; the peer's head it
//    keeps (peer.eth.status: td, bestHash) is the one from the handshake and is never updated, and
//    its periodic sync (FullSynchronizer.best/latest) reads only that. So when node B misses the
//    announcement of block N (sealed by A), A may not seal N+1 (Clique: "too recently signed"),
//    no further announcement comes, B's sync sees nothing newer than the handshake: both wait for
//    ever (and 0.9.0's sync loop is by then parked on a finished fetcher: it never asks again).
//    The nudge does what geth's chain syncer does: when our head has not moved for 2 s, it asks
//    every peer (once a second) for the headers after our head (GetBlockHeaders from height+1,
//    up to 64), fetches their bodies and imports the blocks as the client's BlockFetcher does
//    (falling back on the client's NewBlockHashes path). A real remedy for a real network: one
//    small request per peer per second, and only while the chain stands still.
//
//    CROWDFL_SYNC_NUDGE=0 switches it (and 5) off, to show the stall it prevents.
//
// 5. Test hook for (4): with CROWDFL_DROP_ANNOUNCEMENTS=<file> set, incoming NewBlock and
//    NewBlockHashes messages are dropped while <file> exists (a lost announcement, on demand).
'use strict';
const fs = require('fs');
const Module = require('module');
const net = require('net');
const dgram = require('dgram');
const readline = require('readline');

if (readline.default === undefined) readline.default = readline;

const LOOPBACK = '127.0.0.1';
const isWildcard = (h) => h === undefined || h === null || h === '' || h === '0.0.0.0' || h === '::';
const isLoopback = (h) => typeof h === 'string' && (h === 'localhost' || h === '::1' || h.startsWith('127.'));

function refuse(what, host) {
  const err = new Error(`loopback-only: refused ${what} to ${host}`);
  err.code = 'EACCES';
  return err;
}

const origListen = net.Server.prototype.listen;
net.Server.prototype.listen = function listen(...args) {
  if (typeof args[0] === 'object' && args[0] !== null && !Array.isArray(args[0])) {
    if (isWildcard(args[0].host)) args[0] = { ...args[0], host: LOOPBACK };
  } else if (typeof args[0] === 'number' || typeof args[0] === 'string') {
    if (typeof args[1] !== 'string' || isWildcard(args[1])) {
      args.splice(1, typeof args[1] === 'string' ? 1 : 0, LOOPBACK);
    }
  }
  return origListen.apply(this, args);
};

const origBind = dgram.Socket.prototype.bind;
dgram.Socket.prototype.bind = function bind(...args) {
  if (typeof args[0] === 'object' && args[0] !== null) {
    if (isWildcard(args[0].address)) args[0] = { ...args[0], address: LOOPBACK };
  } else if (typeof args[1] !== 'string' || isWildcard(args[1])) {
    args.splice(1, typeof args[1] === 'string' ? 1 : 0, LOOPBACK);
  }
  return origBind.apply(this, args);
};

const origConnect = net.Socket.prototype.connect;
net.Socket.prototype.connect = function connect(...args) {
  const opts = typeof args[0] === 'object' && args[0] !== null ? (Array.isArray(args[0]) ? args[0][0] : args[0]) : null;
  if (opts && opts.path) return origConnect.apply(this, args); // unix socket
  const host = opts ? opts.host : args[1];
  if (host !== undefined && !isLoopback(host)) {
    process.nextTick(() => this.destroy(refuse('connect', host)));
    return this;
  }
  return origConnect.apply(this, args);
};

const origSend = dgram.Socket.prototype.send;
dgram.Socket.prototype.send = function send(...args) {
  const host = args.find((a, i) => i > 0 && typeof a === 'string');
  if (host !== undefined && !isLoopback(host)) {
    const cb = args.find((a) => typeof a === 'function');
    if (cb) process.nextTick(() => cb(refuse('send', host)));
    return undefined;
  }
  return origSend.apply(this, args);
};

const SEAL_GATE = process.env.CROWDFL_SEAL_GATE;
const DROP_ANNOUNCEMENTS = process.env.CROWDFL_DROP_ANNOUNCEMENTS;
const NUDGE_HEADERS = 64;

function patchMiner(Miner) {
  if (!SEAL_GATE || Miner.__crowdflSealGate) return;
  Miner.__crowdflSealGate = true;
  const assemble = Miner.prototype.assembleBlock;
  Miner.prototype.assembleBlock = async function gatedAssembleBlock(...a) {
    if (!fs.existsSync(SEAL_GATE)) {
      if (!this.__crowdflGateLogged) {
        this.__crowdflGateLogged = true;
        this.config.logger.info(`Miner: seal gate closed (${SEAL_GATE}), not sealing yet`);
      }
      if (this.running) this._nextAssemblyTimeoutId = setTimeout(() => void this.queueNextAssembly(0), 100);
      return undefined;
    }
    if (!this.__crowdflGateOpenLogged) {
      this.__crowdflGateOpenLogged = true;
      this.config.logger.info('Miner: seal gate open');
    }
    return assemble.apply(this, a);
  };
}

const NUDGE_EVERY_MS = 1000;
const NUDGE_AFTER_STILL_MS = 2000;

async function nudge(sync, handleNewBlockHashes) {
  // Our head has not moved for a while: ask each peer for the headers after it, fetch what a peer
  // has and import it (or, failing that, treat it as announced: NewBlockHashes).
  const blocks = sync.chain.blocks;
  const height = blocks.height;
  if (sync.__crowdflHeight !== height) {
    sync.__crowdflHeight = height;
    sync.__crowdflSince = Date.now();
    return;
  }
  if (Date.now() - sync.__crowdflSince < NUDGE_AFTER_STILL_MS) return;
  for (const peer of sync.pool.peers) {
    if (peer.eth === undefined) continue;
    const got = await Promise.race([
      peer.eth.getBlockHeaders({ block: height + 1n, max: NUDGE_HEADERS }),
      new Promise((resolve) => setTimeout(resolve, 5000).unref()),
    ]);
    const headers = (Array.isArray(got) ? got[1] : []).filter((h) => h.header === undefined && h.number > height);
    if (headers.length === 0) continue;
    const last = headers[headers.length - 1];
    sync.config.logger.info(`Sync nudge: peer ${peer.id.slice(0, 8)} has blocks ${height + 1n}..${last.number} we were not told about; fetching them`);
    sync.__crowdflSince = Date.now();
    if (BlockClass !== undefined) {
      // fetch the bodies and import the blocks ourselves, as the client's BlockFetcher does
      const got2 = await Promise.race([
        peer.eth.getBlockBodies({ hashes: headers.map((h) => h.hash()) }),
        new Promise((resolve) => setTimeout(resolve, 5000).unref()),
      ]);
      const bodies = Array.isArray(got2) && Array.isArray(got2[1]) ? got2[1] : [];
      const fetched = [];
      for (const [i, body] of bodies.entries()) {
        const values = [headers[i].raw(), body[0], body[1]];
        if (body[2] !== undefined) values.push(body[2]);
        const block = BlockClass.fromValuesArray(values, { common: headers[i].common });
        await block.validateData();
        fetched.push(block);
      }
      if (fetched.length > 0) {
        const stored = await sync.chain.putBlocks(fetched);
        sync.config.events.emit('sync:fetcher:fetched_blocks', fetched.slice(0, stored));
        sync.config.logger.info(`Sync nudge: imported ${stored} block(s) up to ${fetched[fetched.length - 1].header.number}`);
        return;
      }
    }
    // fall back on the client's own announcement path
    handleNewBlockHashes.call(sync, headers.map((h) => [h.hash(), h.number]));
    let td = blocks.td;
    for (const h of headers) td += h.difficulty;
    if (peer.eth.status.td < td) {
      peer.eth.status.td = td;  // and the peer's head as the sync loop's best() reads it
      peer.eth.status.bestHash = last.hash();
    }
    return;
  }
}

function patchFullSync(FullSynchronizer) {
  if (FullSynchronizer.__crowdflNudge) return;
  FullSynchronizer.__crowdflNudge = true;
  const proto = FullSynchronizer.prototype;
  const handleNewBlockHashes = proto.handleNewBlockHashes;
  if (process.env.CROWDFL_SYNC_NUDGE !== '0') installNudge(proto, handleNewBlockHashes);
  if (DROP_ANNOUNCEMENTS) installDropHook(proto, handleNewBlockHashes);
}

function installNudge(proto, handleNewBlockHashes) {
  const open = proto.open;
  proto.open = async function nudgedOpen(...a) {
    const result = await open.apply(this, a);
    if (!this.__crowdflNudgeTimer) {
      let busy = false;
      this.__crowdflNudgeTimer = setInterval(() => {
        if (busy || !this.opened) return;
        busy = true;
        nudge(this, handleNewBlockHashes)
          .catch((err) => this.config.logger.debug(`Sync nudge failed: ${err && err.message}`))
          .finally(() => { busy = false; });
      }, NUDGE_EVERY_MS);
      this.__crowdflNudgeTimer.unref();
    }
    return result;
  };
  const close = proto.close;
  proto.close = async function nudgedClose(...a) {
    if (this.__crowdflNudgeTimer) clearInterval(this.__crowdflNudgeTimer);
    this.__crowdflNudgeTimer = undefined;
    return close.apply(this, a);
  };
}

function installDropHook(proto, handleNewBlockHashes) {
  {
    const dropped = (self, what) => {
      if (!fs.existsSync(DROP_ANNOUNCEMENTS)) return false;
      self.config.logger.info(`Test: dropped an incoming ${what} announcement`);
      return true;
    };
    const onBlock = proto.handleNewBlock;
    proto.handleNewBlock = async function maybeDropNewBlock(block, peer, ...rest) {
      // the miner hands its own sealed blocks in here too (no peer): only announcements are dropped
      return peer !== undefined && dropped(this, 'NewBlock') ? undefined : onBlock.call(this, block, peer, ...rest);
    };
    proto.handleNewBlockHashes = function maybeDropNewBlockHashes(...a) {
      return dropped(this, 'NewBlockHashes') ? undefined : handleNewBlockHashes.apply(this, a);
    };
  }
}

let BlockClass;  // @ethereumjs/block's Block, the instance the client itself loaded

const origLoad = Module._load;
Module._load = function load(...args) {
  const exported = origLoad.apply(this, args);
  if (exported) {
    // `in`, not a property read: reading a missing export of a module that is still loading
    // (a circular require) makes node print a warning
    if (BlockClass === undefined && 'Block' in exported && typeof exported.Block === 'function'
        && typeof exported.Block.fromValuesArray === 'function') {
      BlockClass = exported.Block;
    }
    if ('Miner' in exported && typeof exported.Miner === 'function' && exported.Miner.prototype.assembleBlock) {
      patchMiner(exported.Miner);
    }
    if ('FullSynchronizer' in exported && typeof exported.FullSynchronizer === 'function'
        && exported.FullSynchronizer.prototype.best) {
      patchFullSync(exported.FullSynchronizer);
    }
  }
  return exported;
};
