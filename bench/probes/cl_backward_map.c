// The channels-last backward's second pass on S3 (NC 4096 x 1024, f32), two threads:
// variants of dx = a*dy + b*(x - m) + k, each timed after a cache flush and a first pass
// over x and dy (as in the backward), alternating in rounds; medians and minima printed.
// Build and run (outside CI):
//   gcc -O2 -march=native -fopenmp cl_backward_map.c -o cl_backward_map &&
//   for set in layout distance arith; do OMP_NUM_THREADS=2 ./cl_backward_map 0 $set; done
// Sets: "layout" (rows per coefficient load, store width, prefetch), "distance"
// (prefetch distance and hint), "arith" (f32 vs f64, three coefficients, 256-bit f64).
// Quoted in bench/RESULTS.md ("Seventh session"): the f64 map with a prefetch to L2
// 16 KiB ahead ran 1.7 ms against 2.1-2.2 ms without; a trivial streamed x + dy 1.0 ms.
// The argument (dy's offset in floats) shifts dy against x.
#include <immintrin.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>
#include <omp.h>
static double now(){struct timespec t;clock_gettime(CLOCK_MONOTONIC,&t);return t.tv_sec+t.tv_nsec*1e-9;}
#define N (4096L*1024)
#define C 1024
float *x,*dy,*dx,*junk,*junk2; double *tm,*ta,*tb,*tk; float *fm,*fa,*fb,*fk;
volatile float sink;
static float touch(const float*p,long n){__m512 s=_mm512_setzero_ps();for(long i=0;i<n;i+=16)s=_mm512_add_ps(s,_mm512_loadu_ps(p+i));return _mm512_reduce_add_ps(s);}
static void first(){ 
 #pragma omp parallel
 { int t=omp_get_thread_num(),T=omp_get_num_threads(); long a=N/T*t,b=N/T*(t+1); float s=touch(x+a,b-a)+touch(dy+a,b-a); if(s==1.2345f)sink=s; }
}
static void flush(){
 #pragma omp parallel for
 for(long i=0;i<3*N;i+=16) _mm512_storeu_ps(junk2+i,_mm512_loadu_ps(junk+i));
}
static void vfloor(){
 #pragma omp parallel for schedule(static)
 for(long c0=0;c0<N;c0+=32768){ float s=touch(x+c0,32768)+touch(dy+c0,32768); if(s==1.2345f)sink=s;
   for(long i=c0;i<c0+32768;i+=16) _mm512_stream_ps(dx+i,_mm512_loadu_ps(x+i)); }
}
static inline void eight(long i,long o){
  __m512d X=_mm512_cvtps_pd(_mm256_loadu_ps(x+i)), D=_mm512_cvtps_pd(_mm256_loadu_ps(dy+i));
  __m512d m=_mm512_loadu_pd(tm+o),a=_mm512_loadu_pd(ta+o),b=_mm512_loadu_pd(tb+o),k=_mm512_loadu_pd(tk+o);
  __m512d r=_mm512_fmadd_pd(a,D,_mm512_fmadd_pd(b,_mm512_sub_pd(X,m),k));
  _mm256_stream_ps(dx+i,_mm512_cvtpd_ps(r));
}
static void vflat(){
 #pragma omp parallel for schedule(static)
 for(long r=0;r<4096;r++) for(long j=0;j<C;j+=8) eight(r*C+j,j);
}
static void vrows2(){
 #pragma omp parallel for schedule(static)
 for(long r=0;r<4096;r+=2) for(long j=0;j<C;j+=16){
   __m512d m0=_mm512_loadu_pd(tm+j),a0=_mm512_loadu_pd(ta+j),b0=_mm512_loadu_pd(tb+j),k0=_mm512_loadu_pd(tk+j);
   __m512d m1=_mm512_loadu_pd(tm+j+8),a1=_mm512_loadu_pd(ta+j+8),b1=_mm512_loadu_pd(tb+j+8),k1=_mm512_loadu_pd(tk+j+8);
   for(int q=0;q<2;q++){ long i=(r+q)*C+j;
     __m512d X=_mm512_cvtps_pd(_mm256_loadu_ps(x+i)), D=_mm512_cvtps_pd(_mm256_loadu_ps(dy+i));
     _mm256_stream_ps(dx+i,_mm512_cvtpd_ps(_mm512_fmadd_pd(a0,D,_mm512_fmadd_pd(b0,_mm512_sub_pd(X,m0),k0))));
     X=_mm512_cvtps_pd(_mm256_loadu_ps(x+i+8)); D=_mm512_cvtps_pd(_mm256_loadu_ps(dy+i+8));
     _mm256_stream_ps(dx+i+8,_mm512_cvtpd_ps(_mm512_fmadd_pd(a1,D,_mm512_fmadd_pd(b1,_mm512_sub_pd(X,m1),k1))));
   }}
}
static void vf32(){
 #pragma omp parallel for schedule(static)
 for(long r=0;r<4096;r++) for(long j=0;j<C;j+=16){ long i=r*C+j;
   __m512 X=_mm512_loadu_ps(x+i),D=_mm512_loadu_ps(dy+i);
   _mm512_stream_ps(dx+i,_mm512_fmadd_ps(_mm512_loadu_ps(fa+j),D,_mm512_fmadd_ps(_mm512_loadu_ps(fb+j),_mm512_sub_ps(X,_mm512_loadu_ps(fm+j)),_mm512_loadu_ps(fk+j))));}
}
static void vtriv(){
 #pragma omp parallel for schedule(static)
 for(long i=0;i<N;i+=16) _mm512_stream_ps(dx+i,_mm512_add_ps(_mm512_loadu_ps(x+i),_mm512_loadu_ps(dy+i)));
}
// f64 arithmetic, but x,dy loaded as 512 bits (16 floats), chunk of the row in L1-sized pieces
static void vpre(){
 #pragma omp parallel for schedule(static)
 for(long r=0;r<4096;r++){ for(long j=0;j<C;j+=8){ long i=r*C+j; if((j&15)==0){_mm_prefetch((char*)(x+i+C*2),_MM_HINT_T0);_mm_prefetch((char*)(dy+i+C*2),_MM_HINT_T0);} eight(i,j);} }
}

double *tk2,*tint;
static void v3coef(){
 #pragma omp parallel for schedule(static)
 for(long r=0;r<4096;r++) for(long j=0;j<C;j+=8){ long i=r*C+j;
  __m512d X=_mm512_cvtps_pd(_mm256_loadu_ps(x+i)), D=_mm512_cvtps_pd(_mm256_loadu_ps(dy+i));
  __m512d r_=_mm512_fmadd_pd(_mm512_loadu_pd(ta+j),D,_mm512_fmadd_pd(_mm512_loadu_pd(tb+j),X,_mm512_loadu_pd(tk2+j)));
  _mm256_stream_ps(dx+i,_mm512_cvtpd_ps(r_));}
}
static void vinter(){
 #pragma omp parallel for schedule(static)
 for(long r=0;r<4096;r++) for(long j=0;j<C;j+=8){ long i=r*C+j; const double*t=tint+j*4;
  __m512d X=_mm512_cvtps_pd(_mm256_loadu_ps(x+i)), D=_mm512_cvtps_pd(_mm256_loadu_ps(dy+i));
  __m512d r_=_mm512_fmadd_pd(_mm512_loadu_pd(t+8),D,_mm512_fmadd_pd(_mm512_loadu_pd(t+16),_mm512_sub_pd(X,_mm512_loadu_pd(t)),_mm512_loadu_pd(t+24)));
  _mm256_stream_ps(dx+i,_mm512_cvtpd_ps(r_));}
}
static void vf32pf(){
 #pragma omp parallel for schedule(static)
 for(long r=0;r<4096;r++) for(long j=0;j<C;j+=16){ long i=r*C+j;
   _mm_prefetch((char*)(x+i+C*2),_MM_HINT_T0);_mm_prefetch((char*)(dy+i+C*2),_MM_HINT_T0);
   __m512 X=_mm512_loadu_ps(x+i),D=_mm512_loadu_ps(dy+i);
   _mm512_stream_ps(dx+i,_mm512_fmadd_ps(_mm512_loadu_ps(fa+j),D,_mm512_fmadd_ps(_mm512_loadu_ps(fb+j),_mm512_sub_ps(X,_mm512_loadu_ps(fm+j)),_mm512_loadu_ps(fk+j))));}
}
static void vpre4(){
 #pragma omp parallel for schedule(static)
 for(long r=0;r<4096;r++){ for(long j=0;j<C;j+=8){ long i=r*C+j; if((j&15)==0){_mm_prefetch((char*)(x+i+C*4),_MM_HINT_T1);_mm_prefetch((char*)(dy+i+C*4),_MM_HINT_T1);} eight(i,j);} }
}
static void vpre1(){
 #pragma omp parallel for schedule(static)
 for(long r=0;r<4096;r++){ for(long j=0;j<C;j+=8){ long i=r*C+j; if((j&15)==0){_mm_prefetch((char*)(x+i+C),_MM_HINT_T0);_mm_prefetch((char*)(dy+i+C),_MM_HINT_T0);} eight(i,j);} }
}

#define PF(name,D,H) static void name(){ _Pragma("omp parallel for schedule(static)") for(long r=0;r<4096;r++){ for(long j=0;j<C;j+=8){ long i=r*C+j; if((j&15)==0){_mm_prefetch((char*)(x+i+C*D),H);_mm_prefetch((char*)(dy+i+C*D),H);} eight(i,j);} } }
PF(p2t1,2,_MM_HINT_T1) PF(p4t1,4,_MM_HINT_T1) PF(p8t1,8,_MM_HINT_T1) PF(p16t1,16,_MM_HINT_T1) PF(p4t0,4,_MM_HINT_T0) PF(p4t2,4,_MM_HINT_T2) PF(p8t2,8,_MM_HINT_T2) PF(p4nta,4,_MM_HINT_NTA)

static void pf_at(long i){ if(i+4096<N){_mm_prefetch((char*)(x+i+4096),_MM_HINT_T1);_mm_prefetch((char*)(dy+i+4096),_MM_HINT_T1);} }
static void c3pf(){
 #pragma omp parallel for schedule(static)
 for(long r=0;r<4096;r++) for(long j=0;j<C;j+=8){ long i=r*C+j; if((j&15)==0) pf_at(i);
  __m512d X=_mm512_cvtps_pd(_mm256_loadu_ps(x+i)), D=_mm512_cvtps_pd(_mm256_loadu_ps(dy+i));
  __m512d r_=_mm512_fmadd_pd(_mm512_loadu_pd(ta+j),D,_mm512_fmadd_pd(_mm512_loadu_pd(tb+j),X,_mm512_loadu_pd(tk2+j)));
  _mm256_stream_ps(dx+i,_mm512_cvtpd_ps(r_));}
}
static void r2pf(){
 #pragma omp parallel for schedule(static)
 for(long r=0;r<4096;r+=2) for(long j=0;j<C;j+=16){
   __m512d m0=_mm512_loadu_pd(tm+j),a0=_mm512_loadu_pd(ta+j),b0=_mm512_loadu_pd(tb+j),k0=_mm512_loadu_pd(tk+j);
   __m512d m1=_mm512_loadu_pd(tm+j+8),a1=_mm512_loadu_pd(ta+j+8),b1=_mm512_loadu_pd(tb+j+8),k1=_mm512_loadu_pd(tk+j+8);
   for(int q=0;q<2;q++){ long i=(r+q)*C+j; pf_at(i);
     __m512d X=_mm512_cvtps_pd(_mm256_loadu_ps(x+i)), D=_mm512_cvtps_pd(_mm256_loadu_ps(dy+i));
     _mm256_stream_ps(dx+i,_mm512_cvtpd_ps(_mm512_fmadd_pd(a0,D,_mm512_fmadd_pd(b0,_mm512_sub_pd(X,m0),k0))));
     X=_mm512_cvtps_pd(_mm256_loadu_ps(x+i+8)); D=_mm512_cvtps_pd(_mm256_loadu_ps(dy+i+8));
     _mm256_stream_ps(dx+i+8,_mm512_cvtpd_ps(_mm512_fmadd_pd(a1,D,_mm512_fmadd_pd(b1,_mm512_sub_pd(X,m1),k1))));
   }}
}
static void f32pf(){
 #pragma omp parallel for schedule(static)
 for(long r=0;r<4096;r++) for(long j=0;j<C;j+=16){ long i=r*C+j; pf_at(i);
   __m512 X=_mm512_loadu_ps(x+i),D=_mm512_loadu_ps(dy+i);
   _mm512_stream_ps(dx+i,_mm512_fmadd_ps(_mm512_loadu_ps(fa+j),D,_mm512_fmadd_ps(_mm512_loadu_ps(fb+j),_mm512_sub_ps(X,_mm512_loadu_ps(fm+j)),_mm512_loadu_ps(fk+j))));}
}
static void trivpf(){
 #pragma omp parallel for schedule(static)
 for(long i=0;i<N;i+=16){ pf_at(i); _mm512_stream_ps(dx+i,_mm512_add_ps(_mm512_loadu_ps(x+i),_mm512_loadu_ps(dy+i)));}
}
// f64 via 256-bit halves
static void f64y(){
 #pragma omp parallel for schedule(static)
 for(long r=0;r<4096;r++) for(long j=0;j<C;j+=4){ long i=r*C+j; if((j&15)==0) pf_at(i);
  __m256d X=_mm256_cvtps_pd(_mm_loadu_ps(x+i)), D=_mm256_cvtps_pd(_mm_loadu_ps(dy+i));
  __m256d r_=_mm256_fmadd_pd(_mm256_loadu_pd(ta+j),D,_mm256_fmadd_pd(_mm256_loadu_pd(tb+j),_mm256_sub_pd(X,_mm256_loadu_pd(tm+j)),_mm256_loadu_pd(tk+j)));
  _mm_stream_ps(dx+i,_mm256_cvtpd_ps(r_));}
}

static void r2pfz(){
 #pragma omp parallel for schedule(static)
 for(long r=0;r<4096;r+=2) for(long j=0;j<C;j+=16){
   __m512d m0=_mm512_loadu_pd(tm+j),a0=_mm512_loadu_pd(ta+j),b0=_mm512_loadu_pd(tb+j),k0=_mm512_loadu_pd(tk+j);
   __m512d m1=_mm512_loadu_pd(tm+j+8),a1=_mm512_loadu_pd(ta+j+8),b1=_mm512_loadu_pd(tb+j+8),k1=_mm512_loadu_pd(tk+j+8);
   for(int q=0;q<2;q++){ long i=(r+q)*C+j; pf_at(i);
     __m512d X=_mm512_cvtps_pd(_mm256_loadu_ps(x+i)), D=_mm512_cvtps_pd(_mm256_loadu_ps(dy+i));
     __m256 lo=_mm512_cvtpd_ps(_mm512_fmadd_pd(a0,D,_mm512_fmadd_pd(b0,_mm512_sub_pd(X,m0),k0)));
     X=_mm512_cvtps_pd(_mm256_loadu_ps(x+i+8)); D=_mm512_cvtps_pd(_mm256_loadu_ps(dy+i+8));
     __m256 hi=_mm512_cvtpd_ps(_mm512_fmadd_pd(a1,D,_mm512_fmadd_pd(b1,_mm512_sub_pd(X,m1),k1)));
     _mm512_stream_ps(dx+i,_mm512_insertf32x8(_mm512_castps256_ps512(lo),hi,1));
   }}
}
static void r4pf(){
 #pragma omp parallel for schedule(static)
 for(long r=0;r<4096;r+=4) for(long j=0;j<C;j+=16){
   __m512d m0=_mm512_loadu_pd(tm+j),a0=_mm512_loadu_pd(ta+j),b0=_mm512_loadu_pd(tb+j),k0=_mm512_loadu_pd(tk+j);
   __m512d m1=_mm512_loadu_pd(tm+j+8),a1=_mm512_loadu_pd(ta+j+8),b1=_mm512_loadu_pd(tb+j+8),k1=_mm512_loadu_pd(tk+j+8);
   for(int q=0;q<4;q++){ long i=(r+q)*C+j; pf_at(i);
     __m512d X=_mm512_cvtps_pd(_mm256_loadu_ps(x+i)), D=_mm512_cvtps_pd(_mm256_loadu_ps(dy+i));
     _mm256_stream_ps(dx+i,_mm512_cvtpd_ps(_mm512_fmadd_pd(a0,D,_mm512_fmadd_pd(b0,_mm512_sub_pd(X,m0),k0))));
     X=_mm512_cvtps_pd(_mm256_loadu_ps(x+i+8)); D=_mm512_cvtps_pd(_mm256_loadu_ps(dy+i+8));
     _mm256_stream_ps(dx+i+8,_mm512_cvtpd_ps(_mm512_fmadd_pd(a1,D,_mm512_fmadd_pd(b1,_mm512_sub_pd(X,m1),k1))));
   }}
}
typedef void(*fn)();
int main(int argc,char**argv){
  long off=argc>1?atol(argv[1]):0; // dy offset in floats
  x=aligned_alloc(4096,N*4+4096); dy=aligned_alloc(4096,N*4+4096); dx=aligned_alloc(4096,N*4+4096);
  dy+=off; x+=4; dx+=16;
  junk=aligned_alloc(4096,3*N*4); junk2=aligned_alloc(4096,3*N*4);
  for(long i=0;i<N;i++){x[i]=(i%97)*0.1f+3;dy[i]=(i%13)*0.2f-1;dx[i]=0;}
  memset(junk,1,3*N*4);memset(junk2,1,3*N*4);
  tm=aligned_alloc(64,C*8);ta=aligned_alloc(64,C*8);tb=aligned_alloc(64,C*8);tk=aligned_alloc(64,C*8);
  fm=aligned_alloc(64,C*4);fa=aligned_alloc(64,C*4);fb=aligned_alloc(64,C*4);fk=aligned_alloc(64,C*4);
  tk2=aligned_alloc(64,C*8);tint=aligned_alloc(64,C*32);
  for(int c=0;c<C;c++){tk2[c]=0.02+0.01*(3+c*0.001);tint[(c/8)*32+c%8]=3+c*0.001;tint[(c/8)*32+8+c%8]=1.1;tint[(c/8)*32+16+c%8]=-0.01;tint[(c/8)*32+24+c%8]=0.02;tm[c]=fm[c]=3+c*0.001;ta[c]=fa[c]=1.1;tb[c]=fb[c]=-0.01;tk[c]=fk[c]=0.02;}
  const char*set=argc>2?argv[2]:"layout";
  fn lf[]={vfloor,vflat,vtriv,vrows2,p4t1,r2pf,r2pfz,r4pf}; const char*ln[]={"floor(touch,touch,ntcopy)","flat f64","trivial add","rows2 f64","flat f64+pf4 T1","rows2+pf","rows2+pf+zmm store","rows4+pf"};
  fn df[]={vflat,vtriv,vpre1,vpre,p2t1,p4t1,p8t1,p16t1,p4t0,p4t2,p8t2,p4nta,vpre4,trivpf}; const char*dn[]={"flat f64","trivial add","pf1 T0","pf2 T0","p2t1","p4t1","p8t1","p16t1","p4t0","p4t2","p8t2","p4nta","pf4 T1 (per 16)","triv+pf"};
  fn af[]={vflat,vtriv,vf32,f32pf,vf32pf,v3coef,c3pf,vinter,f64y}; const char*an[]={"flat f64","trivial add","flat f32","f32+pf","f32+pf2 T0","f64 3coef","3coef+pf","f64 interleaved tbl","f64 ymm+pf"};
  fn*f=lf; const char**nm=ln; int V=8;
  if(!strcmp(set,"distance")){f=df;nm=dn;V=14;} else if(!strcmp(set,"arith")){f=af;nm=an;V=9;}
  int R=30; double t[14][30];
  for(int r=0;r<R;r++) for(int q=0;q<V;q++){ int v=(r&1)?V-1-q:q; flush(); first(); double t0=now(); f[v](); t[v][r]=now()-t0; }
  for(int v=0;v<V;v++){ // median
    double*a=t[v]; for(int i=0;i<R;i++)for(int j=i+1;j<R;j++)if(a[j]<a[i]){double z=a[i];a[i]=a[j];a[j]=z;}
    printf("%-28s median %.3f ms min %.3f ms\n",nm[v],a[R/2]*1e3,a[0]*1e3);}
}
