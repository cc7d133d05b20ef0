/*
 * The one thing vbglue needs from V8 itself: an ArrayBuffer over memory V8
 * does not own and must not count.
 *
 * Node-API's external ArrayBuffer gives its backing store a deleter, so V8
 * counts its length as external memory a collection could free; a jump of
 * more than 64 MiB makes it start a full mark-compact inside the call that
 * creates the buffer. A mapping is freed by munmap (vbglue's unmap() or its
 * finalizer), never by V8, and costs no heap: with an empty deleter V8 counts
 * it as 0 bytes (BackingStore::PerIsolateAccountingLength). Measured on this
 * machine: mapping 256 MiB beside 60 MiB of live objects took 3-14 ms and was
 * followed by a 70-90 ms mark-compact each time; this way, 0.03-0.1 ms and
 * no collection. It matters most on a migration's destination, where the
 * guest's memory is mapped after the guest has resumed.
 */
#include <cstring>
#include <memory>

#include <node_api.h>
#include <v8.h>

extern "C" napi_value vb_unaccounted_arraybuffer(void *data, size_t len) {
  v8::Isolate *isolate = v8::Isolate::GetCurrent();
  std::unique_ptr<v8::BackingStore> store =
      v8::ArrayBuffer::NewBackingStore(data, len, v8::BackingStore::EmptyDeleter, nullptr);
  v8::Local<v8::ArrayBuffer> buffer = v8::ArrayBuffer::New(isolate, std::move(store));
  // A napi_value is the handle a v8::Local holds (Node's
  // v8impl::JsValueFromV8LocalValue); the caller's callback scope keeps it alive.
  napi_value out;
  static_assert(sizeof out == sizeof buffer, "a napi_value is one v8::Local");
  std::memcpy(&out, &buffer, sizeof out);
  return out;
}
