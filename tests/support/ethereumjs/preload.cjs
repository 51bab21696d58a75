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
if (SEAL_GATE) {
  const origLoad = Module._load;
  Module._load = function load(...args) {
    const exported = origLoad.apply(this, args);
    const Miner = exported && exported.Miner;
    if (typeof Miner === 'function' && Miner.prototype.assembleBlock && !Miner.__crowdflSealGate) {
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
    return exported;
  };
}
